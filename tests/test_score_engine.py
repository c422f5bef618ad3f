"""Scoring under the base model, the engine: the batch plan, a hand-computed model, batched = unbatched, the
vocabulary-blocked head, `score_records` against the training encoding, models with their own forward, robust z,
and the real model in bf16."""

from __future__ import annotations

import math
import random

import pytest
from score_helpers import demo_rows, reference_nlls

from tasks.common import nll as nll_engine
from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.nll import plan_batches, robust_z, sequence_nlls, token_nlls
from tasks.score import score_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------------------
# The engine


def test_batch_plan_groups_by_shared_prefix_and_respects_budgets():
    system_a, system_b = list(range(100, 130)), list(range(200, 212))
    rng = random.Random(0)
    seqs = [system_a + [rng.randrange(1, 99) for _ in range(rng.randrange(2, 40))] for _ in range(20)]
    seqs += [system_b + [rng.randrange(1, 99) for _ in range(rng.randrange(2, 40))] for _ in range(9)]
    seqs += [[5, 6, 7], [1]]  # a row sharing nothing, and one too short to score
    plan = plan_batches(seqs, batch_size=4, batch_tokens=100, min_shared_prefix=8)

    placed = sorted(i for g in plan for b in g.batches for i in b)
    assert placed == list(range(30))  # every scorable row exactly once
    prefixes = sorted(len(g.prefix) for g in plan)
    assert prefixes == [0, len(system_b), len(system_a)]
    for group in plan:
        shared = len(group.prefix)
        for batch in group.batches:
            assert all(seqs[i][:shared] == group.prefix and len(seqs[i]) - shared >= 2 for i in batch)
            width = max(len(seqs[i]) - 1 - shared for i in batch)
            assert len(batch) <= 4 and (len(batch) == 1 or len(batch) * width <= 100)
            assert [len(seqs[i]) for i in batch] == sorted((len(seqs[i]) for i in batch), reverse=True)


def _bigram_model():
    """A 4-token Llama whose layers add nothing: logits = RMSNorm(embedding) @ embeddingᵀ, a bigram model.

    With embedding = c·I (hidden size 4), the normalized state is 2·e_i, the logits 2c·e_i, so with 2c = ln 3 the
    next token repeats the current one with probability 3/(3+3) = 1/2 and is any other with 1/6.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=4, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-12, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(4) * math.log(3) / 2)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize(("share_prefix", "batch_size"), [(True, 2), (False, 3), (True, 16)])
def test_hand_computed_bigram_model(share_prefix, batch_size):
    same, other = math.log(2), math.log(6)
    seqs = [
        [0, 0, 1, 1, 2, 3, 3, 3],
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 3, 0],
        [0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 1],
        [2, 2],
        [3, 1, 1],
    ]
    expected = [[same if b == a else other for a, b in zip(s, s[1:])] for s in seqs]
    got = sequence_nlls(_bigram_model(), seqs, pad_id=0, batch_size=batch_size, share_prefix=share_prefix, min_shared_prefix=3)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)
    # Perplexity of the first row by hand: 4 repeats (0→0, 1→1, 3→3, 3→3) and 3 changes.
    first = got[0]
    assert math.exp(sum(first) / len(first)) == pytest.approx(math.exp((4 * same + 3 * other) / 7), rel=1e-5)


@pytest.mark.parametrize(
    ("batch_size", "batch_tokens", "share_prefix", "logits_chunk"),
    [(16, None, True, 512), (5, 64, True, 7), (3, None, False, 512), (64, 4096, False, 33)],
)
def test_batched_scores_equal_unbatched_on_random_lengths(tiny, batch_size, batch_tokens, share_prefix, logits_chunk):
    model, _ = tiny
    rng = random.Random(batch_size)
    vocab = model.config.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(17)]
    seqs = []
    for i in range(40):
        body = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 70))]
        seqs.append(system + body if i % 3 else body + [rng.randrange(3, vocab)])
    got = sequence_nlls(
        model, seqs, pad_id=2, batch_size=batch_size, batch_tokens=batch_tokens, share_prefix=share_prefix,
        logits_chunk=logits_chunk,
    )
    for seq, nll in zip(seqs, got):
        ref = reference_nlls(model, seq)
        assert len(nll) == len(seq) - 1
        assert nll == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert math.exp(sum(nll) / len(nll)) == pytest.approx(math.exp(sum(ref) / len(ref)), rel=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_vocabulary_blocked_head_equals_cross_entropy_over_full_logits(bias):
    """The CPU path never forms the full logits: its running log-sum-exp over vocabulary blocks (a last block shorter
    than the rest, targets in every block, large logits) must equal cross-entropy over the full product."""
    import torch

    torch.manual_seed(0)
    vocab = 3 * nll_engine._VOCAB_BLOCK + 77
    head = torch.nn.Linear(24, vocab, bias=bias)
    with torch.no_grad():
        head.weight.mul_(40)  # logits in the hundreds: a naive sum of exp would overflow
    hidden = torch.randn(50, 24)
    targets = torch.cat([torch.arange(0, vocab, vocab // 45)[:45], torch.tensor([vocab - 1, 0, 1023, 1024, 2048])])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
        got = nll_engine._nll_of(head, hidden, targets, chunk=16)
    assert bool(torch.isfinite(got).all())
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-4)


def test_score_records_matches_per_example_computation_with_the_training_encoding(tiny, tmp_path):
    import pandas as pd

    model, tok = tiny
    rows = demo_rows(24)
    result = score_records(rows, model, tok, max_length=64, batch_size=5, outlier_z=3.5, out_path=tmp_path / "s.parquet")
    frame = pd.read_parquet(tmp_path / "s.parquet")
    assert list(frame["id"]) == [r["id"] for r in rows]
    for row, scored in zip(rows, result.rows):
        enc = encode_chat(tok, row, 64)  # exactly what training encodes
        ref = reference_nlls(model, enc["input_ids"])
        answer = [ref[j - 1] for j, label in enumerate(enc["labels"]) if label != -100]
        assert scored["token_nll"] == pytest.approx(answer, rel=1e-4)
        assert scored["ppl"] == pytest.approx(math.exp(sum(answer) / len(answer)), rel=1e-4)
        assert scored["seq_ppl"] == pytest.approx(math.exp(sum(ref) / len(ref)), rel=1e-4)
        assert scored["seq_tokens"] == len(enc["input_ids"]) - 1
        assert [enc["labels"][p] for p in scored["token_pos"]] == [enc["input_ids"][p] for p in scored["token_pos"]]
    # evaluate's perplexity goes through the same engine: answer-token NLLs in row order.
    encoded = [encode_chat(tok, r, 64) for r in rows]
    assert token_nlls(model, tok, encoded, 7)[3] == pytest.approx(result.rows[3]["token_nll"], rel=1e-4)


def test_models_whose_logits_are_not_head_of_decoder_use_their_own_forward(tiny_model_dir):
    """A model that rescales its logits: the self-check notices and scoring follows the model's own forward."""
    import torch
    from transformers import LlamaForCausalLM

    class Rescaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = Rescaled.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    seqs = [[1, 5, 9, 14, 3, 7], [1, 5, 9, 22, 40]]
    got = sequence_nlls(model, seqs, pad_id=2, batch_size=4)
    for seq, nll in zip(seqs, got):
        assert nll == pytest.approx(reference_nlls(model, seq), rel=1e-5)


def test_the_self_check_allows_for_half_precision_rounding_of_large_logits_only():
    from tasks.common.nll import paths_agree

    # a tuned SmolLM2 in bf16 (logits up to 37.5): the two paths 0.14 nats apart on an NLL of 3.4, 0.25 on 10.6
    fast, full = [3.5139, 10.8028, 0.4181], [3.3699, 10.5547, 0.4057]
    assert paths_agree(fast, full, half=True, logit_scale=37.5)
    assert not paths_agree([3.5139, 10.8028, 0.9], full, half=True, logit_scale=37.5)  # 0.5 nats on a near-0 NLL
    assert not paths_agree(fast, full, half=False, logit_scale=37.5)  # fp32 rounds far less
    assert not paths_agree([3 * x for x in full], full, half=True, logit_scale=3 * 37.5)  # logits rescaled x3
    assert paths_agree(full, full, half=False, logit_scale=0.0)


def test_robust_z_by_hand():
    # median 2, |deviations| 1,0,0,1,8 -> MAD 1; scale 1.4826
    assert robust_z([1.0, 2.0, 2.0, 3.0, 10.0]) == pytest.approx([-1 / 1.4826, 0, 0, 1 / 1.4826, 8 / 1.4826])


@pytest.mark.slow
def test_real_model_in_bf16_keeps_the_fast_path_and_the_fp32_numbers(real_base_model, caplog):
    """bf16 rounds the fast path and the model's own forward differently (shape-dependent matrix products); the
    self-check must still accept it (no fall-back to the slower full forward) and the answers' log-perplexities stay
    within 0.05 nats of fp32."""
    import torch

    tok = load_tokenizer(real_base_model.path)
    seqs = [encode_chat(tok, r, 160)["input_ids"] for r in demo_rows(6)]
    fp32 = sequence_nlls(load_model(real_base_model.path, dtype=torch.float32), seqs, pad_id=tok.pad_token_id, batch_size=8)
    with caplog.at_level("WARNING", logger="fewtune.score"):
        bf16 = sequence_nlls(
            load_model(real_base_model.path, dtype=torch.bfloat16), seqs, pad_id=tok.pad_token_id, batch_size=8
        )
    assert "full forward" not in caplog.text
    for a, b in zip(bf16, fp32):
        assert sum(a) / len(a) == pytest.approx(sum(b) / len(b), abs=0.05)
