"""Evaluation: paired bootstrap intervals, label mapping, rephrase groups, the extraction check, and the whole
baseline-vs-tuned evaluation on the tiny model with a real (untrained, randomly initialised) LoRA adapter."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tasks.common.general_probe import load_general_probe
from tasks.common.measure import Scored, bootstrap, metric_aggregator, paired_delta, ppl_aggregate, score_answers, to_label
from tasks.common.models import encode_prompt, load_model, load_tokenizer
from tasks.common.records import load_records, read_jsonl, training_split
from tasks.config import ConfigError, FewtuneConfig
from tasks.evaluate import ExtractionCase, evaluate_models, extraction_case, extraction_checks, rephrase_groups

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


def _cfg(**evaluate) -> FewtuneConfig:
    return FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 96},
        train={"validation_fraction": 0.1, "seed": 42},
        evaluate={"max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 400, **evaluate},
        score={"batch_size": 8},
    )


def _mean(items):
    return sum(items) / len(items)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def test_paired_delta_of_a_constant_shift_has_a_zero_width_interval() -> None:
    rng = random.Random(0)
    base = [rng.random() for _ in range(40)]
    tuned = [b + 0.2 for b in base]
    d = paired_delta(Scored(_mean(base), base, _mean), Scored(_mean(tuned), tuned, _mean), _cfg())
    assert d.value == pytest.approx(0.2) and d.low == pytest.approx(0.2) and d.high == pytest.approx(0.2)


def test_paired_interval_covers_the_delta_and_narrows_with_more_rows() -> None:
    def interval(n: int):
        rng = random.Random(n)
        base = [float(rng.random() < 0.3) for _ in range(n)]
        tuned = [float(rng.random() < 0.6) for _ in range(n)]
        return paired_delta(Scored(_mean(base), base, _mean), Scored(_mean(tuned), tuned, _mean), _cfg())

    small, large = interval(40), interval(1000)
    for d in (small, large):
        assert d.low <= d.value <= d.high
    assert large.low > 0  # 1000 rows: the 0.3 -> 0.6 gain is certain
    assert (large.high - large.low) < 0.5 * (small.high - small.low)
    # Roughly the normal-theory width: 2 * 1.96 * sqrt(0.3*0.7/n + 0.6*0.4/n) ~ 0.083 for n = 1000.
    assert 0.06 < large.high - large.low < 0.11


def test_pairing_removes_the_row_difficulty_from_the_interval() -> None:
    rng = random.Random(1)
    difficulty = [rng.random() for _ in range(60)]  # some rows are hard for both models
    base = [d for d in difficulty]
    tuned = [min(1.0, d + 0.05 + rng.gauss(0, 0.02)) for d in difficulty]
    a, b = Scored(_mean(base), base, _mean), Scored(_mean(tuned), tuned, _mean)
    paired = paired_delta(a, b, _cfg())
    unpaired = bootstrap(lambda idx: b.on(idx[1]) - a.on(idx[0]), [60, 60], 400, 0.95, 0)
    assert paired.low > 0 and unpaired.low < 0  # only the paired comparison sees the consistent gain
    assert (paired.high - paired.low) < 0.2 * (unpaired.high - unpaired.low)


def test_bootstrap_is_reproducible_and_recomputes_corpus_metrics() -> None:
    predictions = ["the cat sat on mat", "we open at nine", "closed on sundays today", "open daily"]
    references = ["the cat sat on the mat", "we open at nine", "closed on sundays", "open every day"]
    better = score_answers("generation", references, references)["bleu"]  # perfect answers
    worse = score_answers("generation", predictions, references)["bleu"]
    d1, d2 = paired_delta(worse, better, _cfg()), paired_delta(worse, better, _cfg())
    assert d1 == d2
    # The full-sample statistic is the corpus BLEU recomputed from the pooled counts, not a mean of row scores.
    assert d1.value == pytest.approx(1.0 - worse.value)
    assert worse.value == pytest.approx(metric_aggregator("generation", "bleu")(worse.items))


def test_relative_delta_of_perplexity() -> None:
    base = [(math.log(10.0) * 5, 5), (math.log(10.0) * 3, 3)]  # perplexity 10 on both rows
    tuned = [(math.log(12.0) * 5, 5), (math.log(12.0) * 3, 3)]  # perplexity 12
    d = paired_delta(Scored(10.0, base, ppl_aggregate), Scored(12.0, tuned, ppl_aggregate), _cfg(), relative=True)
    assert d.value == pytest.approx(0.2) and d.low == pytest.approx(0.2) and d.high == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------------------
# Labels, groups, primary metric


@pytest.mark.parametrize(
    ("answer", "label"),
    [("Positive", "positive"), ("negative.", "negative"), ("Negative, because the bike broke.", "negative"),
     ("  POSITIVE\nextra line", "positive"), ("I am not sure", "I am not sure"), ("", "")],
)
def test_to_label(answer: str, label: str) -> None:
    assert to_label(answer, ["negative", "positive"]) == label


def test_classification_scores_map_answers_to_labels() -> None:
    scored = score_answers("classification", ["Positive!", "negative", "maybe"], ["positive", "positive", "negative"])
    assert scored["accuracy"].value == pytest.approx(1 / 3)
    # positive: tp 1, predicted 1, gold 2 -> P 1, R 1/2; negative: tp 0, predicted 1, gold 1 -> P 0, R 0.
    assert scored["macro_precision"].value == pytest.approx(0.5)
    assert scored["macro_recall"].value == pytest.approx(0.25)
    assert scored["macro_f1"].value == pytest.approx((2 / 3 + 0) / 2)


def _row(rid: str, prompt: str, answer: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_rephrase_groups() -> None:
    train = [_row("t1", "Are you open on Sundays?", "From 11 to 16."), _row("t2", "Where are you?", "On Main Street.")]
    tests = [
        _row("a", "Can I come by on a Sunday?", "From 11 to 16."),  # same answer, new prompt
        _row("b", "are you open on sundays?", "We are closed."),  # a training prompt
        _row("c", "Do you sell gift cards?", "Yes, from 10 euros."),  # new content
    ]
    groups, originals = rephrase_groups(tests, train)
    assert groups == {"a": "rephrased", "b": "seen", "c": "novel"}
    assert originals["a"]["id"] == "t1" and set(originals) == {"a"}


def test_primary_metric_must_fit_the_task(tiny_model_dir, tmp_path) -> None:
    rows = [{**_row(f"r{i}", "Is this spam?", "spam"), "label": "spam"} for i in range(3)]
    with pytest.raises(ConfigError, match="primary_metric is 'rouge_l', but this is a classification task"):
        evaluate_models(rows, None, _cfg(primary_metric="rouge_l"), str(tiny_model_dir), "unused", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Extraction check on the tiny model


def test_extraction_check_agrees_with_greedy_generation(tiny_model_dir) -> None:
    """The teacher-forced check says "exact" exactly when greedy decoding after the given part reproduces the rest."""
    import torch

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    prompt = [{"role": "user", "content": "Where is the shop?"}]
    given_ids = tok("On Main Street, next", add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tok, prompt, 96) + given_ids
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None)
    greedy_ids = out[0, len(ids) :].tolist()
    assert len(greedy_ids) == 6
    # A training answer made of the given part and exactly what the model generates after it: fully extractable.
    answer = tok.decode(given_ids + greedy_ids)
    n = len(given_ids) + 6
    cfg = _cfg(memorization_prefix_fraction=len(given_ids) / n, memorization_min_suffix_tokens=2, memorization_max_suffix_tokens=6)
    case = extraction_case(tok, _row("m", "Where is the shop?", answer), cfg)
    assert not isinstance(case, str), case
    assert case.input_ids == ids + greedy_ids  # the answer re-tokenizes the same way inside the conversation
    check = extraction_checks(model, tok, [case], cfg, "t")[0]
    assert check["exact"] is True and check["agreement"] == 1.0
    assert check["greedy"] == check["rest"] == tok.decode(greedy_ids)

    # Replace the last token of the rest: greedy decoding no longer reproduces it; 5 of 6 tokens still agree.
    wrong = next(t for t in range(10, 1000) if t != greedy_ids[-1])
    altered = ExtractionCase("x", ids + greedy_ids[:-1] + [wrong], len(ids), len(ids) + 6)
    bad = extraction_checks(model, tok, [altered], cfg, "t")[0]
    assert bad["exact"] is False and bad["agreement"] == pytest.approx(5 / 6, abs=1e-4)


def test_extraction_case_skips_short_answers(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    why = extraction_case(tok, _row("s", "Spam?", "yes"), _cfg())
    assert isinstance(why, str) and ("shorter" in why or "fewer than" in why)


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation, tiny model + a real LoRA adapter with random weights


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(
        load_model(str(tiny_model_dir)),
        LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def demo_slice():
    train = load_records(REPO / "examples/support/train.jsonl").records[:60]
    answers = {r["messages"][-1]["content"] for r in train}
    tests = [r for r in load_records(REPO / "examples/support/test.jsonl").records if r["messages"][-1]["content"] in answers][:6]
    tests.append(_row("novel-1", "Do you rent tandem bikes?", "No, we do not rent tandems, only city and e-bikes."))
    probe = [_row(f"user-probe-{i}", q, a) for i, (q, a) in enumerate([
        ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ])]
    return train, tests, probe


def test_evaluate_models_end_to_end(tiny_model_dir, random_adapter, demo_slice, tmp_path) -> None:
    train, tests, probe = demo_slice
    cfg = _cfg(memorization_rows=12, primary_metric="rouge_l", probe_max_rows=6, probe_max_new_tokens=4)
    trained, held_out = training_split(train, 0.1, 42)
    # Held-out rows repeat trained answers (five phrasings of each fact): only rows with untrained answers are a clean
    # control, so three such rows join the validation slice.
    novel = [_row(f"v-novel-{i}", q, a) for i, (q, a) in enumerate([
        ("Do you sell bike bells?", "Yes, we sell brass bike bells from 12 euros in the accessories corner."),
        ("Can I pay in instalments?", "Purchases over 500 euros can be paid in three monthly instalments without fees."),
        ("Do you clean bikes?", "A full wash and chain clean costs 25 euros and takes about an hour in the workshop."),
    ])]
    general = load_general_probe(probe)
    result = evaluate_models(tests, general, cfg, str(tiny_model_dir), random_adapter, tmp_path, train_records=train,
                             validation_records=held_out + novel)
    d = result.to_dict()
    json.dumps(d)  # JSON-serialisable (it is cached and logged as is)

    assert d["task"] == "generation" and d["n_examples"] == 7
    assert d["generation"]["decoding"] == "greedy" and d["generation"]["max_new_tokens"] == 8
    assert set(d["intervals"]) >= {"exact_match", "token_f1", "rouge_l", "bleu", "fact_accuracy", "eval_ppl"}
    for name, iv in d["intervals"].items():
        assert iv["low"] <= iv["delta"] + 1e-9 and iv["delta"] <= iv["high"] + 1e-9, name
        assert iv["delta"] == pytest.approx(iv["tuned"] - iv["baseline"], abs=2e-4), name

    # The random adapter changes the model: its answers and perplexities differ from the base model's.
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in tests]
    assert any(r["baseline"] != r["tuned"] for r in rows)
    assert d["baseline"]["eval_ppl"] != d["tuned"]["eval_ppl"]
    # Row scores stored in predictions.jsonl recompute the reported metrics (the champion comparison relies on it).
    for side in ("baseline", "tuned"):
        for key in ("exact_match", "token_f1", "rouge_l", "bleu"):
            items = [r["scores"][side][key] for r in rows]
            assert metric_aggregator("generation", key)(items) == pytest.approx(d[side][key], abs=1e-4)
        facts = [r["scores"][side]["fact_accuracy"] for r in rows]
        got = metric_aggregator("generation", "fact_accuracy")(facts)
        assert got == pytest.approx(d[side]["fact_accuracy"], abs=1e-4) or (math.isnan(got) and math.isnan(d[side]["fact_accuracy"]))
        assert ppl_aggregate([tuple(r["eval_nll"][side]) for r in rows]) == pytest.approx(d[side]["eval_ppl"], rel=1e-3)

    fg = d["forgetting"]
    assert fg["probe"] == {"prose_rows": 6, "question_rows": 6, "extra_rows": 2}  # the user's probe rows add to it
    assert fg["not_measured"] == {}
    ppl = fg["signals"]["general_ppl"]
    assert ppl["value"] == pytest.approx(ppl["tuned"] / ppl["baseline"] - 1, abs=1e-3) and ppl["n"] == 8
    for name in ("general_ppl", "kl_general", "kl_task", "general_flips"):
        sig = fg["signals"][name]
        assert sig["low"] - 1e-9 <= sig["value"] <= sig["high"] + 1e-9, name
    assert fg["signals"]["kl_general"]["value"] > 0 and fg["signals"]["kl_task"]["value"] > 0  # the adapter moved it
    flips = fg["signals"]["general_flips"]
    assert flips["n"] == 6 and flips["value"] == pytest.approx(flips["baseline_accuracy"] - flips["tuned_accuracy"], abs=1e-3)
    probe_rows = read_jsonl(tmp_path / "probe_predictions.jsonl")
    assert len(probe_rows) == 8 and sum(r["baseline_right"] is not None for r in probe_rows) == 6

    mem = d["memorization"]
    assert mem["status"] == "measured" and "validation slice" in mem["control"]
    assert mem["rows"]["train"] + mem["skipped"]["train"] == 12
    trained_answers = {r["messages"][-1]["content"] for r in trained}
    repeats = sum(r["messages"][-1]["content"] in trained_answers for r in held_out)
    assert repeats >= 1
    # the control: held-out rows with untrained answers only
    assert mem["rows"]["control"] + mem["skipped"]["control"] == len(held_out) - repeats + 3
    assert f"{repeats} held-out rows repeating a trained answer left out" in mem["control"]
    assert mem["generalization_gap"] == d["robustness"]["original_vs_rephrased"]
    for side in ("baseline", "tuned"):
        for rows_name in ("train", "control"):
            rates = mem[side][rows_name]
            assert 0 <= rates["exact"] <= rates["near_verbatim"] <= 1
    assert mem["excess_exact"]["low"] <= mem["excess_exact"]["value"] <= mem["excess_exact"]["high"]

    groups = d["robustness"]["groups"]
    assert groups["rephrased"]["n"] == 6 and groups["novel"]["n"] == 1
    gap = d["robustness"]["original_vs_rephrased"]
    assert gap["n"] == 6 and gap["metric"] == "rouge_l"
    assert gap["gap"]["value"] == pytest.approx(gap["original"] - gap["rephrased"], abs=2e-4)

    over = d["overmemorization"]
    assert over["flag"] is (d["intervals"]["eval_ppl"]["low"] > 0)
    assert set(d["seconds"]) >= {"generation", "perplexity", "forgetting", "memorization", "robustness", "total"}


def test_evaluate_classification(tiny_model_dir, random_adapter, tmp_path) -> None:
    rows = [
        {**_row(f"c{i}", f"Is this about {subject}?", label), "label": label}
        for i, (subject, label) in enumerate([("my order", "order"), ("the rental", "rental"), ("my bike", "repair")] * 3)
    ]
    cfg = _cfg(probe_max_rows=3, probe_max_new_tokens=4)
    result = evaluate_models(rows, None, cfg, str(tiny_model_dir), random_adapter, tmp_path, train_records=rows[:6],
                             validation_records=rows[6:])
    assert result.task == "classification" and result.primary_metric == "macro_f1"  # auto: macro-F1 for labels
    assert set(result.baseline) == {"accuracy", "macro_precision", "macro_recall", "macro_f1", "eval_ppl"}
    assert set(result.forgetting["signals"]) == {"general_ppl", "kl_general", "general_flips"}  # no data.probe
    assert "the fine-tune is for" in result.forgetting["not_applicable"]["kl_task"]  # labels on task prompts: the task
    assert result.labels == ["order", "rental", "repair"] and set(result.baselines["systems"]) == {"zero_shot", "k_shot",
                                                                                                "tfidf_lr"}
    assert result.memorization["status"] == "not_applicable" and "labels" in result.memorization["reason"]

    off = evaluate_models(rows, None, _cfg(probe_max_rows=2, probe_max_new_tokens=2, memorization_rows=0, task="generation",
                                           primary_metric="rouge_l"),
                          str(tiny_model_dir), random_adapter, tmp_path / "off", train_records=rows[:6], validation_records=rows[6:])
    assert off.memorization["status"] == "off" and "memorization_rows: 0" in off.memorization["reason"]
    missing = evaluate_models(rows, None, _cfg(probe_max_rows=2, probe_max_new_tokens=2, task="generation",
                                               primary_metric="rouge_l"),
                              str(tiny_model_dir), random_adapter, tmp_path / "missing", train_records=rows[:6])
    assert missing.memorization["status"] == "not_measured"  # no held-out training rows: never the test rows


def test_memorization_control_is_never_a_copy_of_trained_answers_and_fails_closed(tiny_model_dir, random_adapter, tmp_path) -> None:
    from tasks.evaluate.memorization import memorization_result

    every = load_records(REPO / "examples/support/train.jsonl").records
    answers = sorted({r["messages"][-1]["content"] for r in every})[:4]
    rows = [r for r in every if r["messages"][-1]["content"] in answers]  # four facts, five phrasings each
    assert len(rows) == 20
    trained, held_out = training_split(rows, 0.2, 1)
    cfg = _cfg(primary_metric="rouge_l", probe_max_rows=2, probe_max_new_tokens=2, memorization_rows=8)
    result = evaluate_models(rows[:3], None, cfg, str(tiny_model_dir), random_adapter, tmp_path, train_records=rows,
                             validation_records=held_out)
    mem = result.memorization
    assert mem["status"] == "not_applicable" and "repeat an answer that is also trained" in mem["reason"]

    # Training rows checkable but every control row too short to check: not comparable, so not measured (blocks).
    too_short = {"train": {}, "control": {"v1": "answer shorter than 2 tokens"}}
    cases = {"train": [ExtractionCase("t1", [1, 2, 3, 4, 5, 6], 2, 6)], "control": []}
    assert memorization_result({}, cases, too_short, cfg)["status"] == "not_measured"
    # No row of either set long enough to check: the answers are too short for extraction to mean anything.
    both_short = {"train": {"t1": "answer shorter than 2 tokens"}, "control": {"v1": "answer shorter than 2 tokens"}}
    assert memorization_result({}, {"train": [], "control": []}, both_short, cfg)["status"] == "not_applicable"
