"""Scoring under the base model, the stage: STM masks token by token, the guard, outlier actions and their report,
`fewtune score`, the STM hook in training, the flow with both switched on, and the real model's outliers."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import yaml
from score_helpers import REPO, demo_rows, reference_nlls

from flows.cli import main
from tasks.common.models import EncodingError, encode_chat, load_model, load_tokenizer, pick_dtype
from tasks.common.nll import robust_z
from tasks.common.records import read_jsonl, split_train_eval, write_jsonl
from tasks.common.stm import mask_rows, masking_collator, select_masked
from tasks.config import FewtuneConfig, ScoreConfig
from tasks.score import finish_scores, score_records
from tasks.train import make_collator, train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------------------
# STM


def test_stm_masks_verified_token_by_token(tiny, tmp_path):
    """Scores → masks → the training collator: exactly the answer tokens above the threshold lose their label."""
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
    # a two-token answer (a label and its end-of-turn token) keeps both: never only the end token left to learn
    assert summary["masked_tokens"] == 2 and summary["answer_tokens"] == 7
    assert rows[0]["masked_fraction"] == pytest.approx(0.4) and rows[1]["n_masked"] == 0
    off = mask_rows(rows, 1.0001, 0.5, enabled=False)
    assert off["would_mask_fraction"] == pytest.approx(2 / 7, abs=1e-4) and not any(rows[0]["token_masked"])


def test_stm_never_masks_a_label():
    """A label is the whole answer and often its most surprising part: labelled rows keep every token's loss."""
    rows = [
        {"id": "q1", "token_nll": [6.0, 5.0, 4.0, 0.1], "token_pos": [9, 10, 11, 12], "ids_hash": "x"},
        {"id": "chat", "token_nll": [6.0, 5.0, 4.0, 0.1], "token_pos": [9, 10, 11, 12], "ids_hash": "y"},
    ]
    summary = mask_rows(rows, 1.0001, 0.5, enabled=True, never={"q1"})
    assert not any(rows[0]["token_masked"]) and rows[0]["n_masked"] == 0
    assert rows[1]["n_masked"] == 2 and summary["rows_never_masked"] == 1


def test_train_stage_applies_the_masks(tiny, tiny_model_dir, tmp_path, caplog):
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
    model, tok = tiny
    rows = demo_rows(30)
    folder = tmp_path_factory.mktemp("scored")
    return rows, score_records(rows, model, tok, max_length=64, batch_size=8, outlier_z=3.5, out_path=folder / "scores.parquet")


@pytest.mark.parametrize("action", ["keep", "drop", "augment"])
def test_outlier_action_and_report(scored_rows, tmp_path, action):
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
    rows, result = scored_rows
    result = copy.deepcopy(result)
    for r in result.rows:
        r["outlier"] = True
    with pytest.raises(EncodingError, match="score.outlier_z"):
        finish_scores(result, rows, ScoreConfig(outlier_action="drop"), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_fewtune_score_cli(tiny_model_dir, tmp_path, capsys):
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
    data = write_jsonl(tmp_path / "rows.jsonl", demo_rows(6))
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(data), "--model", str(tiny_model_dir), "--name", "explore", "--set", "model.max_length=64"]) == 0
    assert (tmp_path / "runs" / "explore" / "scores.parquet").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The flow with STM and outlier dropping switched on


def test_flow_with_stm_and_outlier_drop(tmp_path, tiny_model_dir):
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune  # imports Prefect (seconds): only where the flow runs

    write_jsonl(tmp_path / "train.jsonl", read_jsonl(REPO / "examples/support/train.jsonl")[:40])
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(REPO / "examples/support/test.jsonl")[:4])
    cfg = {
        "name": "stmflow",
        "data": {"train": "train.jsonl", "eval": "test.jsonl"},
        "model": {"base": str(tiny_model_dir), "max_length": 96},
        "score": {"outlier_z": 1.0, "outlier_action": "drop", "token_masking": {"enabled": True, "threshold": 200.0}},
        "train": {"method": "lora", "max_steps": 2, "batch_size": 8, "replay_fraction": 0},
        "evaluate": {"max_new_tokens": 4, "batch_size": 4, "memorization_rows": 0, "probe_max_rows": 4, "probe_max_new_tokens": 4},
        "register": {"enabled": False},
        "run": {"runs_dir": str(tmp_path / "runs"), "name": "stm"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with prefect_test_harness(server_startup_timeout=180):  # the default 30 s is too short on a busy 2-core machine
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
