"""Label-constrained prediction: the answer tokens of a label, the plan of shared positions, the fast path against
one plain forward per prompt+label (plain model, LoRA on and off, prefix tuning, a model the fast path cannot
reproduce, truncated prompts, templates whose answers differ per prompt), random label sets, bf16, and the
calibration / confusion summaries."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.common.calibration import confusion_matrix, expected_calibration_error, most_confused, reliability_bins
from tasks.common.label_scoring import (
    LabelScores,
    encode_label_prompts,
    label_token_ids,
    plan_labels,
    score_labels,
)
from tasks.common.models import encode_prompt, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

LABELS = ["transfer", "transfer_money", "balance", "card lost", "x", "refund of a card payment please"]
SYSTEM = {"role": "system", "content": "You are a support classifier. Answer with one label: " + ", ".join(LABELS)}
QUESTIONS = ["Where is the shop?", "Can I return a bike I bought online? " * 3, "ok", "My order has not arrived yet."]


def _prompts(questions=QUESTIONS, system=True):
    return [([SYSTEM] if system else []) + [{"role": "user", "content": q}] for q in questions]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import torch

    return load_model(str(tiny_model_dir), dtype=torch.float32)


def reference(model, tok, prompts, labels, max_length=512):
    """log p(answer | prompt) from one plain forward of prompt+answer per label, no batching, no cache."""
    import torch

    ids, answers = encode_label_prompts(tok, prompts, labels, max_length)
    out = []
    with torch.inference_mode():
        for p, conts in zip(ids, answers):
            row = []
            for c in conts:
                logp = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
                row.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c)))
            out.append(row)
    return out


def scored(caplog, *args, **kwargs) -> LabelScores:
    """score_labels, checking that the fast path passed its self-check (else the test would compare the fallback)."""
    with caplog.at_level("WARNING", logger="fewtune.label_scoring"):
        caplog.clear()
        out = score_labels(*args, **kwargs)
    assert "disagrees" not in caplog.text
    return out


def assert_close(got: LabelScores, want, tol=1e-4):
    assert len(got.logprobs) == len(want)
    for g, w in zip(got.logprobs, want):
        assert g == pytest.approx(w, abs=tol)


# ----------------------------------------------------------------------------------------------------------------
# Answer tokens and the plan


def test_answer_tokens_are_the_assistant_turn_through_the_end_of_turn_token(tok):
    prompt = _prompts()[0]
    ids = {label: label_token_ids(tok, prompt, label) for label in LABELS}
    for label, answer in ids.items():
        assert answer[-1] == tok.eos_token_id and tok.eos_token_id not in answer[:-1]
        assert tok.decode(answer) == label + "<|im_end|>"
        # Exactly the tokens the training encoding puts after the generation prompt.
        full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": label}], tokenize=False)
        whole = tok(full, add_special_tokens=False)["input_ids"]
        start = len(encode_prompt(tok, prompt, 10_000))
        assert whole[start : start + len(answer)] == answer
    # The end token separates a label from a longer one that starts with it.
    short, long = ids["transfer"], ids["transfer_money"]
    assert long[: len(short) - 1] == short[:-1] and long[: len(short)] != short


def test_templates_whose_answer_does_not_extend_the_prompt_fall_back_to_the_label_and_eos(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>reply\n' }}{% endif %}"
    )
    assert label_token_ids(odd, _prompts()[0], "balance") == tok("balance", add_special_tokens=False)["input_ids"] + [2]


def test_plan_shares_first_tokens_and_rides_prefixes_on_longer_labels():
    # answers: [1 2 9] and [1 2 3 9] share "1 2"; [4 9]; [5] is a one-token answer (end token only after prompt).
    plan = plan_labels([[1, 2, 9], [1, 2, 3, 9], [4, 9], [5]])
    assert plan.firsts == [1, 4, 5] and plan.first_of == [0, 0, 1, 2]
    assert plan.carriers == [[1, 2, 3], [4]]  # [1 2] rides on [1 2 3]
    assert [[plan.pairs[p] for p in ps] for ps in plan.pairs_of] == [
        [(0, 0, 2), (0, 1, 9)],
        [(0, 0, 2), (0, 1, 3), (0, 2, 9)],
        [(1, 0, 9)],
        [],
    ]
    assert len(plan.pairs) == 5  # log p(2 | 1) is read once for both labels
    assert plan.combine([-1.0, -2.0, -3.0], [-0.1, -0.2, -0.3, -0.4, -0.5]) == pytest.approx(
        [-1.3, -1.8, -2.5, -3.0]
    )


def test_label_scores_probabilities_and_predictions_by_hand():
    scores = LabelScores(["a", "b", "c"], [[math.log(0.2), math.log(0.6), math.log(0.2)], [-1.0, -3.0, -1.0]])
    assert scores.probabilities()[0] == pytest.approx([0.2, 0.6, 0.2])
    assert sum(scores.probabilities()[1]) == pytest.approx(1.0)
    assert scores.predictions() == ["b", "a"]  # a tie goes to the first label


# ----------------------------------------------------------------------------------------------------------------
# Fast path = plain forward


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
@pytest.mark.parametrize(
    ("batch_size", "batch_tokens", "share_prefix"),
    [(8, None, True), (3, None, True), (2, 400, True), (8, None, False), (1, 1, True)],
)
def test_fast_path_equals_one_plain_forward_per_prompt_and_label(
    model, tok, caplog, batch_size, batch_tokens, share_prefix, packed
):
    prompts = _prompts() + _prompts(["Do you sell gift cards?", "Thank you!"], system=False)
    got = scored(
        caplog, model, tok, prompts, LABELS, max_length=512, batch_size=batch_size, batch_tokens=batch_tokens,
        share_prefix=share_prefix, packed=packed,
    )
    assert got.labels == LABELS
    assert_close(got, reference(model, tok, prompts, LABELS))
    assert model.training is False


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_label_rows_under_each_attention_equal_the_plain_forward(tiny_model_dir, tok, caplog, attention):
    """The packed path's mask is a boolean for sdpa and added to the scores for eager attention: both reproduce one
    plain forward per prompt+label, prompts of different lengths in one batch (padding between prompt and labels)."""
    import torch
    from transformers import LlamaForCausalLM

    from tasks.common.label_passes import packed_attention

    m = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation=attention).eval()
    assert packed_attention(m.get_decoder()) == attention
    prompts = _prompts() + _prompts(["Do you sell gift cards?", "Thank you!"], system=False)
    got = scored(caplog, m, tok, prompts, LABELS, max_length=512, batch_size=8)
    assert_close(got, reference(m, tok, prompts, LABELS))


def test_training_mode_is_restored_and_empty_inputs(model, tok):
    model.train()
    try:
        assert score_labels(model, tok, [], LABELS, max_length=64, batch_size=4).logprobs == []
        score_labels(model, tok, _prompts()[:1], LABELS, max_length=64, batch_size=4)
        assert model.training is True
    finally:
        model.eval()
    with pytest.raises(ValueError, match="empty"):
        score_labels(model, tok, _prompts(), [], max_length=64, batch_size=4)
    with pytest.raises(ValueError, match="'x'"):
        score_labels(model, tok, _prompts(), ["x", "y", "x"], max_length=64, batch_size=4)


def test_long_prompts_keep_their_last_tokens_so_the_longest_answer_fits(model, tok, caplog):
    prompts = _prompts()
    ids, answers = encode_label_prompts(tok, prompts, LABELS, 40)
    longest = max(len(a) for a in answers[0])
    for p, msgs in zip(ids, prompts):
        full = encode_prompt(tok, msgs, 10_000)
        assert len(p) == min(len(full), 40 - longest) and full[-len(p) :] == p
    got = scored(caplog, model, tok, prompts, LABELS, max_length=40, batch_size=3)
    assert_close(got, reference(model, tok, prompts, LABELS, 40))


def test_templates_whose_answers_depend_on_the_conversation(model, tok, caplog):
    shouty = copy.deepcopy(tok)
    shouty.chat_template = tok.chat_template.replace(
        "message['content']", "(message['content'] | upper if message['role'] == 'assistant' and loop.length > 2 "
        "else message['content'])",
    )
    prompts = _prompts() + _prompts(["Where is the shop?"], system=False)
    _, answers = encode_label_prompts(shouty, prompts, LABELS, 512)
    assert shouty.decode(answers[0][0]) == "TRANSFER<|im_end|>" and shouty.decode(answers[-1][0]) == "transfer<|im_end|>"
    assert_close(scored(caplog, model, shouty, prompts, LABELS, max_length=512, batch_size=4),
                 reference(model, shouty, prompts, LABELS))


def test_a_model_the_fast_path_cannot_reproduce_is_scored_by_its_own_forward(tiny_model_dir, tok, caplog):
    import torch
    from transformers import LlamaForCausalLM

    class Rescaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    rescaled = Rescaled.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with caplog.at_level("WARNING", logger="fewtune.label_scoring"):
        got = score_labels(rescaled, tok, _prompts(), LABELS, max_length=512, batch_size=2)
    assert "disagrees" in caplog.text
    assert_close(got, reference(rescaled, tok, _prompts(), LABELS))


# ----------------------------------------------------------------------------------------------------------------
# Adapters and dtypes


def test_lora_adapter_on_and_off_each_equal_their_plain_forward(tiny_model_dir, tok, caplog):
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir), dtype=torch.float32)
    lora = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                   task_type="CAUSAL_LM"),
    )
    prompts = _prompts()
    on = scored(caplog, lora, tok, prompts, LABELS, max_length=512, batch_size=3)
    assert_close(on, reference(lora, tok, prompts, LABELS))
    with lora.disable_adapter():
        off = scored(caplog, lora, tok, prompts, LABELS, max_length=512, batch_size=3)
        assert_close(off, reference(lora, tok, prompts, LABELS))
    assert max(abs(a - b) for ra, rb in zip(on.logprobs, off.logprobs) for a, b in zip(ra, rb)) > 0.1


def test_prefix_tuning_uses_its_own_forward(tiny_model_dir, tok):
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(1)
    tuned = get_peft_model(
        load_model(str(tiny_model_dir), dtype=torch.float32),
        PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    )
    prompts = _prompts()
    got = score_labels(tuned, tok, prompts, LABELS, max_length=512, batch_size=3)
    assert set(got.predictions()) <= set(LABELS)
    assert_close(got, reference(tuned, tok, prompts, LABELS))
    plain = score_labels(load_model(str(tiny_model_dir), dtype=torch.float32), tok, prompts, LABELS,
                         max_length=512, batch_size=3)
    gap = max(abs(a - b) for ra, rb in zip(got.logprobs, plain.logprobs) for a, b in zip(ra, rb))
    assert gap > 1e-3  # the virtual tokens do reach the scores


def test_bf16_model_scores_every_label_and_stays_near_fp32(tiny_model_dir, tok, model, caplog):
    import torch

    bf16 = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    got = scored(caplog, bf16, tok, _prompts(), LABELS, max_length=512, batch_size=3)
    fp32 = score_labels(model, tok, _prompts(), LABELS, max_length=512, batch_size=3)
    assert all(p in LABELS for p in got.predictions())
    for row, ref in zip(got.logprobs, fp32.logprobs):
        assert all(math.isfinite(x) for x in row)
        assert row == pytest.approx(ref, rel=0.1, abs=0.5)


# ----------------------------------------------------------------------------------------------------------------
# Random label sets

_LABEL = st.text(
    alphabet=st.sampled_from(list("abcxyz_ -") + ["é", "ß", "日", "🙂"]), min_size=1, max_size=12
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=st.lists(_LABEL, min_size=2, max_size=8, unique=True),
    texts=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
    seed=st.randoms(use_true_random=False),
)
def test_random_label_sets_predict_a_label_and_do_not_depend_on_label_order(model, tok, caplog, labels, texts, seed):
    prompts = [[{"role": "system", "content": "Pick one of: " + " | ".join(labels)}, {"role": "user", "content": t}]
               for t in texts]
    got = scored(caplog, model, tok, prompts, labels, max_length=256, batch_size=2)
    assert all(p in labels for p in got.predictions())
    assert all(sum(row) == pytest.approx(1.0) for row in got.probabilities())
    shuffled = list(labels)
    seed.shuffle(shuffled)
    again = scored(caplog, model, tok, prompts, shuffled, max_length=256, batch_size=2)
    for row, other in zip(got.logprobs, again.logprobs):
        by_label = dict(zip(shuffled, other))
        assert row == pytest.approx([by_label[label] for label in labels], abs=1e-4)
    assert_close(got, reference(model, tok, prompts, labels, 256))


# ----------------------------------------------------------------------------------------------------------------
# Calibration and confusion


def test_expected_calibration_error_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 exactly on a bin edge (right, 4 labels).
    probs = [[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.3, 0.25, 0.25, 0.2]]
    gold = [0, 1, 1, 0]
    bins = reliability_bins(probs, gold, bins=10)
    assert [(b.lower, b.count) for b in bins] == [(0.2, 1), (0.5, 1), (0.8, 2)]
    assert bins[2].confidence == pytest.approx(0.9) and bins[2].accuracy == pytest.approx(0.5)
    # (1/4)|1-0.3| + (1/4)|1-0.6| + (2/4)|0.5-0.9| = 0.175 + 0.1 + 0.2
    assert expected_calibration_error(probs, gold, bins=10) == pytest.approx(0.475)
    assert expected_calibration_error(probs, gold, bins=1) == pytest.approx(abs(0.75 - (0.9 + 0.9 + 0.6 + 0.3) / 4))
    assert math.isnan(expected_calibration_error([], []))
    perfect = [[1.0, 0.0], [0.0, 1.0]]
    assert expected_calibration_error(perfect, [0, 1]) == 0.0
    with pytest.raises(ValueError, match="gold"):
        expected_calibration_error(perfect, [0])


def test_confusion_matrix_matches_sklearn_and_names_the_worst_mix_ups():
    labels = ["balance", "transfer", "transfer_money", "card"]
    gold = ["transfer"] * 5 + ["transfer_money"] * 3 + ["balance"] * 2 + ["card"]
    pred = ["transfer", "transfer_money", "transfer_money", "transfer_money", "balance",
            "transfer", "transfer_money", "transfer", "balance", "card", "card"]
    matrix = confusion_matrix(pred, gold, labels)
    assert matrix == [[1, 0, 0, 1], [1, 1, 3, 0], [0, 2, 1, 0], [0, 0, 0, 1]]
    try:
        from sklearn.metrics import confusion_matrix as sk_confusion
    except ImportError:  # pragma: no cover - sklearn is part of the dev environment
        pass
    else:
        assert sk_confusion(gold, pred, labels=labels).tolist() == matrix
    assert most_confused(matrix, labels, 2) == [("transfer", "transfer_money", 3), ("transfer_money", "transfer", 2)]
    assert len(most_confused(matrix, labels, 10)) == 4
    with pytest.raises(ValueError, match="'refund'"):
        confusion_matrix(["refund"], ["card"], labels)


@pytest.mark.slow
def test_real_model_keeps_the_fast_path_in_bf16_and_matches_the_plain_forward_in_fp32(real_base_model, caplog):
    """SmolLM2-135M: in fp32 the fast path equals one plain forward per prompt+label; in bf16 (which rounds every
    path differently) the self-check still accepts the fast path and the log-probabilities stay near fp32."""
    import torch

    tok = load_tokenizer(real_base_model.path)
    labels = ["transfer", "transfer_money", "balance", "card_lost", "card_arrival", "refund", "opening_hours", "thanks"]
    system = {"role": "system", "content": "Classify the customer message. Answer with one label from: " + ", ".join(labels)}
    prompts = [[system, {"role": "user", "content": q}] for q in ["I lost my card yesterday", "When do you open?",
                                                                     "Please send 20 euros to my brother", "Thanks!"]]
    fp32 = load_model(real_base_model.path, dtype=torch.float32)
    exact = scored(caplog, fp32, tok, prompts, labels, max_length=512, batch_size=4)
    assert_close(LabelScores(labels, exact.logprobs[:1]), reference(fp32, tok, prompts[:1], labels), tol=1e-3)
    bf16 = scored(caplog, load_model(real_base_model.path, dtype=torch.bfloat16), tok, prompts, labels, max_length=512,
                  batch_size=4)
    for row, ref in zip(bf16.logprobs, exact.logprobs):
        assert row == pytest.approx(ref, rel=0.1, abs=0.5)
