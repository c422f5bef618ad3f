"""Scoring under the base model: batched = unbatched, a hand-computed model, STM masks token by token, the guard,
outlier actions and their report, `fewtune score`, the STM hook in training, and the flow with both switched on."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tasks.config import FewtuneConfig, ScoreConfig
from tasks.common.records import load_records, read_jsonl, split_train_eval, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tasks.common.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def demo_rows(n: int) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def reference_nlls(model, ids: list[int]) -> list[float]:
    """One sequence alone through the model's own forward: -log_softmax(logits)[next token] at every position."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return (-logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).tolist()


# ----------------------------------------------------------------------------------------------------------------
# The engine


def test_batch_plan_groups_by_shared_prefix_and_respects_budgets():
    from tasks.common.nll import plan_batches

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
    from tasks.common.nll import sequence_nlls

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
    from tasks.common.nll import sequence_nlls

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

    from tasks.common import nll as score

    torch.manual_seed(0)
    vocab = 3 * score._VOCAB_BLOCK + 77
    head = torch.nn.Linear(24, vocab, bias=bias)
    with torch.no_grad():
        head.weight.mul_(40)  # logits in the hundreds: a naive sum of exp would overflow
    hidden = torch.randn(50, 24)
    targets = torch.cat([torch.arange(0, vocab, vocab // 45)[:45], torch.tensor([vocab - 1, 0, 1023, 1024, 2048])])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
        got = score._nll_of(head, hidden, targets, chunk=16)
    assert bool(torch.isfinite(got).all())
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-4)


def test_score_records_matches_per_example_computation_with_the_training_encoding(tiny, tmp_path):
    import pandas as pd

    from tasks.common.models import encode_chat
    from tasks.common.nll import token_nlls
    from tasks.score import score_records

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

    from tasks.common.nll import sequence_nlls

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


def test_robust_z_by_hand():
    from tasks.common.nll import robust_z

    # median 2, |deviations| 1,0,0,1,8 -> MAD 1; scale 1.4826
    assert robust_z([1.0, 2.0, 2.0, 3.0, 10.0]) == pytest.approx([-1 / 1.4826, 0, 0, 1 / 1.4826, 8 / 1.4826])


# ----------------------------------------------------------------------------------------------------------------
# STM


def test_stm_masks_verified_token_by_token(tiny, tmp_path):
    """Scores → masks → the training collator: exactly the answer tokens above the threshold lose their label."""
    from tasks.common.models import encode_chat
    from tasks.score import finish_scores, score_records
    from tasks.common.stm import masking_collator
    from tasks.train import make_collator

    model, tok = tiny
    rows = demo_rows(3)
    max_length = 80
    result = score_records(rows, model, tok, max_length=max_length, batch_size=8, outlier_z=3.5, out_path=tmp_path / "scores.parquet")
    first = sorted(result.rows[0]["token_nll"])
    threshold = math.exp((first[len(first) // 2] + first[len(first) // 2 + 1]) / 2)  # about half of row 0's tokens
    cfg = ScoreConfig(token_masking={"enabled": True, "threshold": threshold, "max_masked_fraction": 0.9})
    stage = finish_scores(result, rows, cfg, tmp_path)

    encoded = [encode_chat(tok, r, max_length) for r in rows]  # the training encoding
    collate = masking_collator(make_collator(tok), stage["token_masks_path"], rows=[e["input_ids"] for e in encoded])
    batch = collate([dict(e) for e in encoded])
    masked_total = 0
    for r, enc in enumerate(encoded):
        ref = reference_nlls(model, enc["input_ids"])
        n = len(enc["input_ids"])
        labels = batch["labels"][r, :n].tolist()
        for j, (tid, label) in enumerate(zip(enc["input_ids"], enc["labels"])):
            if label == -100:
                assert labels[j] == -100, f"row {r} token {j} outside the answer must stay unlabelled"
            elif j > 0 and math.exp(ref[j - 1]) > threshold:
                assert labels[j] == -100, f"row {r} token {j} {tok.decode([tid])!r}: perplexity {math.exp(ref[j - 1]):.1f} > {threshold:.1f}"
                masked_total += 1
            else:
                assert labels[j] == tid, f"row {r} token {j} {tok.decode([tid])!r} must keep its label"
        assert any(label != -100 for label in labels)  # never a whole answer
        assert (batch["labels"][r, n:] == -100).all()
    summary = stage["summary"]["token_masking"]
    assert masked_total == summary["masked_tokens"] > 0
    assert summary["answer_tokens"] == sum(len(x["token_nll"]) for x in result.rows)
    per_row = [x["masked_fraction"] for x in result.rows]
    assert summary["row_fraction_max"] == pytest.approx(max(per_row), abs=1e-4)
    assert summary["masked_fraction"] == pytest.approx(masked_total / summary["answer_tokens"], abs=1e-4)

    # A row encoded differently (another max_length cuts its answer) gets no mask: masks are token-aligned or absent.
    short = encode_chat(tok, rows[0], max_length - 20)
    assert collate.mask(dict(short))["labels"] == short["labels"]


def test_stm_guard_never_masks_a_whole_answer():
    from tasks.common.stm import mask_rows, select_masked

    nll = [0.1, 5.0, 3.0, 4.0, 2.0]
    flags, capped = select_masked(nll, threshold=1.0001, max_masked_fraction=0.5)
    assert capped and flags == [False, True, False, True, False]  # the two most surprising of five
    flags, capped = select_masked([9.0], threshold=1.0001, max_masked_fraction=0.9)
    assert not any(flags) and capped  # a one-token answer keeps its token
    flags, capped = select_masked(nll, threshold=math.exp(3.5), max_masked_fraction=0.5)
    assert flags == [False, True, False, True, False] and not capped

    rows = [
        {"id": "a", "token_nll": nll, "token_pos": [3, 4, 5, 6, 7], "ids_hash": "x"},
        {"id": "b", "token_nll": [0.1, 0.2], "token_pos": [3, 4], "ids_hash": "y"},
    ]
    summary = mask_rows(rows, 1.0001, 0.5, enabled=True)
    assert summary["rows_capped"] == 2 and summary["capped_ids"] == ["a", "b"]
    assert summary["masked_tokens"] == 3 and summary["answer_tokens"] == 7
    assert rows[0]["masked_fraction"] == pytest.approx(0.4) and rows[1]["n_masked"] == 1
    off = mask_rows(rows, 1.0001, 0.5, enabled=False)
    assert off["would_mask_fraction"] == pytest.approx(3 / 7, abs=1e-4) and not any(rows[0]["token_masked"])


def test_train_stage_applies_the_masks(tiny, tiny_model_dir, tmp_path, caplog):
    import logging

    from tasks.score import finish_scores, score_records
    from tasks.train import train_adapter

    model, tok = tiny
    rows = demo_rows(24)
    cfg = FewtuneConfig(
        data={"train": "-"}, model={"max_length": 64},
        train={"method": "lora", "max_steps": 1, "batch_size": 4, "replay_fraction": 0},
        score={"token_masking": {"enabled": True, "threshold": 50.0}},
    )
    result = score_records(rows, model, tok, max_length=64, batch_size=8, outlier_z=3.5, out_path=tmp_path / "s" / "scores.parquet")
    stage = finish_scores(result, rows, cfg.score, tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="fewtune.stm"):
        train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "train", token_masks=stage["token_masks_path"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("STM:"))
    hit, total = (int(x) for x in line.split()[1:4:2])
    train_rows, _ = split_train_eval(rows, cfg.train.validation_fraction, cfg.train.seed)
    assert total == len(train_rows) and 0 < hit <= total


# ----------------------------------------------------------------------------------------------------------------
# Outliers


@pytest.fixture(scope="module")
def scored_rows(tiny, tmp_path_factory):
    from tasks.score import score_records

    model, tok = tiny
    rows = demo_rows(30)
    folder = tmp_path_factory.mktemp("scored")
    return rows, score_records(rows, model, tok, max_length=64, batch_size=8, outlier_z=3.5, out_path=folder / "scores.parquet")


@pytest.mark.parametrize("action", ["keep", "drop", "augment"])
def test_outlier_action_and_report(scored_rows, tmp_path, action):
    import copy

    from tasks.common.nll import robust_z
    from tasks.score import finish_scores

    rows, result = scored_rows
    result = copy.deepcopy(result)
    zs = sorted(robust_z([r["nll_mean"] for r in result.rows]), reverse=True)
    cut = (zs[1] + zs[2]) / 2  # the two highest rows become outliers
    for r in result.rows:
        r["outlier"] = r["log_ppl_z"] > cut
    result.n_outliers = 2
    cfg = ScoreConfig(outlier_z=cut, outlier_action=action)
    stage = finish_scores(result, rows, cfg, tmp_path)

    outliers = json.loads(Path(stage["outliers_path"]).read_text())
    worst = sorted(result.rows, key=lambda r: -r["log_ppl_z"])[:2]
    assert [o["id"] for o in outliers] == [r["id"] for r in worst]
    by_id = {r["id"]: r for r in rows}
    assert outliers[0]["answer"] == by_id[outliers[0]["id"]]["messages"][-1]["content"]  # listed with their text
    passed = [r["id"] for r in read_jsonl(stage["train_path"])]
    if action == "drop":
        assert passed == [r["id"] for r in rows if r["id"] not in {o["id"] for o in outliers}]
        assert stage["summary"]["dropped"] == 2 and stage["augment_ids"] == []
    else:
        assert passed == [r["id"] for r in rows]
        assert stage["augment_ids"] == ([o["id"] for o in outliers] if action == "augment" else [])
    report = Path(stage["report_path"]).read_text()
    assert outliers[0]["id"] in report and "score_histogram.png" in report
    png = Path(stage["histogram_path"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert stage["summary"]["top_outliers"][0]["id"] == outliers[0]["id"]


def test_dropping_every_row_is_a_clear_error(scored_rows, tmp_path):
    import copy

    from tasks.common.models import EncodingError
    from tasks.score import finish_scores

    rows, result = scored_rows
    result = copy.deepcopy(result)
    for r in result.rows:
        r["outlier"] = True
    with pytest.raises(EncodingError, match="score.outlier_z"):
        finish_scores(result, rows, ScoreConfig(outlier_action="drop"), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_fewtune_score_cli(tiny_model_dir, tmp_path, capsys):
    from flows.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl", [{k: v for k, v in r.items() if k != "line"} for r in demo_rows(12)])
    out = tmp_path / "out"
    code = main(["score", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                 "--set", "model.max_length=64", "--set", "score.token_masking.enabled=true"])
    assert code == 0
    for name in ("scores.parquet", "train.jsonl", "outliers.json", "score_report.md", "score_histogram.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "answer tokens masked" in printed and str(out / "scores.parquet") in printed.replace("\n", "")

    missing = main(["score", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--out", str(out)])
    assert missing == 2


def test_score_cli_writes_under_runs_by_default(tiny_model_dir, tmp_path, monkeypatch):
    from flows.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl", demo_rows(6))
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(data), "--model", str(tiny_model_dir), "--name", "explore", "--set", "model.max_length=64"]) == 0
    assert (tmp_path / "runs" / "explore" / "scores.parquet").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The flow with STM and outlier dropping switched on


def test_flow_with_stm_and_outlier_drop(tmp_path, tiny_model_dir):
    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune

    write_jsonl(tmp_path / "train.jsonl", read_jsonl(REPO / "examples/support/train.jsonl")[:40])
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(REPO / "examples/support/test.jsonl")[:4])
    cfg = {
        "name": "stmflow",
        "data": {"train": "train.jsonl", "eval": "test.jsonl"},
        "model": {"base": str(tiny_model_dir), "max_length": 96},
        "score": {"outlier_z": 1.0, "outlier_action": "drop", "token_masking": {"enabled": True, "threshold": 200.0}},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 8, "replay_fraction": 0},
        "evaluate": {"max_new_tokens": 4, "batch_size": 4, "memorization_rows": 0, "probe_generate": False},
        "register": {"enabled": False},
        "run": {"runs_dir": str(tmp_path / "runs"), "name": "stm"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with prefect_test_harness():
        summary = finetune(config_path=str(tmp_path / "config.yaml"))
    sc = summary["score"]
    assert sc["outlier_action"] == "drop" and sc["dropped"] == sc["outliers"] > 0
    assert summary["train"]["train_rows"] + summary["train"]["validation_rows"] == 40 - sc["dropped"]
    assert sc["token_masking"]["enabled"] and sc["token_masking"]["masked_tokens"] > 0
    run_dir = Path(summary["run_dir"])
    for name in ("scores.parquet", "outliers.json", "score_report.md", "score_histogram.png"):
        assert (run_dir / name).is_file(), name
    assert len(json.loads((run_dir / "outliers.json").read_text())) == sc["dropped"]
    assert summary["augment"]["rows"] == 40 - sc["dropped"]  # augment and train received the rows score passed on


# ----------------------------------------------------------------------------------------------------------------
# The real base model


@pytest.mark.slow
def test_real_model_flags_a_garbled_answer_as_the_top_outlier(real_base_model, tmp_path):
    from tasks.common.models import load_model, load_tokenizer, pick_dtype
    from tasks.score import score_records

    rows = demo_rows(24)
    prompt = rows[5]["messages"][:-1]
    rows.append({**rows[5], "id": "garbled", "messages": [*prompt, {"role": "assistant", "content": "qzx vbnm lkj 9#@ wqeert pplo zz xqv mnnb kkrt"}]})
    tok = load_tokenizer(real_base_model.path)
    model = load_model(real_base_model.path, dtype=pick_dtype("auto"))
    result = score_records(rows, model, tok, max_length=160, batch_size=16, outlier_z=3.5, out_path=tmp_path / "s.parquet")
    top = max(result.rows, key=lambda r: r["log_ppl_z"])
    assert top["id"] == "garbled" and top["outlier"]
    assert result.n_outliers <= 2  # the shop's real answers are not outliers
    assert 2 < result.corpus_ppl < 500


@pytest.mark.slow
def test_real_model_in_bf16_keeps_the_fast_path_and_the_fp32_numbers(real_base_model, caplog):
    """bf16 rounds the fast path and the model's own forward differently (shape-dependent matrix products); the
    self-check must still accept it (no fall-back to the slower full forward) and the answers' log-perplexities stay
    within 0.05 nats of fp32."""
    import torch

    from tasks.common.models import encode_chat, load_model, load_tokenizer
    from tasks.common.nll import sequence_nlls

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
