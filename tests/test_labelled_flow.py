"""The whole flow on labelled rows (`text`/`label`, real CLINC150 banking queries) with a tiny in-process model:
predictions are always labels, the label list reaches every prompt, the fair baselines are measured and shown, and the
gate refuses a fine-tune that loses to TF-IDF + logistic regression."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.finetune import finetune
from tasks.common.records import read_jsonl, write_jsonl
from tasks.config import FewtuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _per_label(rows: list[dict], n: int) -> list[dict]:
    kept: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if len(kept[r["label"]]) < n:
            kept[r["label"]].append(r)
    return [r for group in kept.values() for r in group]


def test_labelled_flow_scores_labels_measures_baselines_and_refuses_to_lose(tmp_path, tiny_model_dir, prefect_server,
                                                                           capsys, monkeypatch):
    train = _per_label(read_jsonl(REPO / "examples/intents/train.jsonl"), 8)
    test = _per_label(read_jsonl(REPO / "examples/intents/test.jsonl"), 4)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    labels = sorted({r["label"] for r in train})
    config = {
        "name": "labelflow",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "format": "text_label",
                 "label_descriptions": {"routing": "the bank's routing number"}},
        "model": {"base": str(tiny_model_dir), "max_length": 160, "dtype": "float32"},
        "score": {"token_masking": {"enabled": True, "threshold": 2.0, "max_masked_fraction": 0.9}},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "evals_per_epoch": 1},
        "evaluate": {"batch_size": 8, "bootstrap_samples": 200, "probe_max_rows": 6},
        "register": {"model_name": "labelflow-model"},
        "run": {"runs_dir": str(tmp_path / "runs"), "name": "labels"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = finetune(config_path=str(path))
    run_dir = Path(summary["run_dir"])
    ev = json.loads((run_dir / "eval_results.json").read_text())

    # Labelled rows: macro-F1 decides (primary_metric auto), the label set is the rows' labels.
    assert ev["task"] == "classification" and ev["primary_metric"] == "macro_f1" and ev["labels"] == labels

    # Labelled rows plan the labelled replay share of general rows (train.label_replay_auto_fraction; the tiny random
    # model's blank answers to the general prompts are then dropped, so no replay row is trained on here).
    plan = json.loads((run_dir / "train_plan.json").read_text())
    share = FewtuneConfig(data={"train": "-"}).train.label_replay_auto_fraction
    assert plan["replay_fraction"] == share and "label_replay_auto_fraction" in plan["reasons"]["replay_auto_fraction"]

    # Every training and test prompt carries the label list (with the configured description) in its system turn.
    kept_train, kept_eval = read_jsonl(run_dir / "data" / "train.jsonl"), read_jsonl(run_dir / "data" / "eval.jsonl")
    for row in kept_train + kept_eval:
        system = row["messages"][0]
        assert system["role"] == "system" and all(f"- {label}" in system["content"] for label in labels)
        assert "- routing: the bank's routing number" in system["content"]

    # A label is never masked by STM, even with a threshold that would mask most tokens of any other answer.
    scores = pd.read_parquet(run_dir / "scores.parquet")
    assert len(scores) == len(kept_train) and int(scores["n_masked"].sum()) == 0

    # Predictions are always one of the labels, with a probability per label.
    predictions = read_jsonl(run_dir / "predictions.jsonl")
    assert [r["id"] for r in predictions] == [r["id"] for r in kept_eval] and len(kept_eval) >= 30
    for row in predictions:
        assert row["baseline"] in labels and row["tuned"] in labels
        for side in ("baseline", "tuned"):
            probs = row["probabilities"][side]
            assert sorted(probs) == labels and abs(sum(probs.values()) - 1) < 1e-3
            assert max(probs, key=probs.get) == row[side]
        assert set(row["baselines"]) == {"zero_shot", "k_shot", "tfidf_lr"}
        assert all(p in labels for p in row["baselines"].values())

    # The baselines on the same rows: TF-IDF + LR learns these real queries; the tiny random LLM does not.
    table = ev["baselines"]
    assert list(table["systems"]) == ["zero_shot", "k_shot", "tfidf_lr"]
    tfidf = table["systems"]["tfidf_lr"]
    truth = [r["label"] for r in kept_eval]
    assert tfidf["metrics"]["accuracy"] == pytest.approx(
        sum(row["baselines"]["tfidf_lr"] == g for row, g in zip(predictions, truth)) / len(truth), abs=1e-4)
    assert tfidf["metrics"]["accuracy"] >= 0.5 and table["best"] == "tfidf_lr"
    assert tfidf["tuned_minus"]["delta"] < 0 and ev["worth_it"].startswith("no:")
    assert ev["calibration"]["tuned"]["labels"] == labels
    assert sum(map(sum, ev["calibration"]["tuned"]["confusion"])) == len(kept_eval)
    assert 0 <= ev["calibration"]["tuned"]["ece"] <= 1

    # The gate: a fine-tune that loses to TF-IDF + logistic regression is never promoted.
    reg = summary["register"]
    criteria = {c["name"]: c for c in reg["gate"]["criteria"]}
    assert criteria["beat_baselines"]["status"] == "fail" and not reg["promoted"]
    assert "vs baseline " in criteria["beat_baselines"]["detail"] and not ev["baselines"]["not_measured"]
    assert criteria["memorization"]["status"] == "not_applicable"
    assert criteria["forgetting_kl_task"]["status"] == "not_applicable" and "kl_task" not in ev["forgetting"]["signals"]
    assert criteria["forgetting_kl_general"]["status"] in ("pass", "fail", "insufficient")  # measured on general prompts

    # The report opens with the question, and its baseline table shows the evaluation's numbers.
    html = (run_dir / "report.html").read_text()
    assert html.index("Is fine-tuning worth it here?") < html.index('id="gate"')
    baseline_html = html[html.index('<table id="baselines">'): html.index("</table>", html.index('<table id="baselines">'))]
    for name, b in table["systems"].items():
        cells = re.search(rf"<td>{name}.*?</td>\s*<td class=\"num\">([0-9.]+)</td><td class=\"num\">([0-9.]+)</td>",
                          baseline_html, re.S)
        assert cells, name
        assert float(cells.group(1)) == pytest.approx(b["metrics"]["accuracy"], abs=1e-4)
        assert float(cells.group(2)) == pytest.approx(b["metrics"]["macro_f1"], abs=1e-4)
    assert 'id="confusion"' in html and "Labels: confusions and calibration" in html

    # The run summary and the CLI say it too.
    from flows.cli import common
    from flows.cli.run import print_summary

    assert summary["evaluate"]["worth_it"] == ev["worth_it"] and summary["evaluate"]["baselines"]["best"] == "tfidf_lr"
    assert "correct" not in summary["evaluate"]["baselines"]["systems"]["tfidf_lr"]  # no per-row lists in the summary
    monkeypatch.setattr(common.console, "width", 300)
    capsys.readouterr()
    print_summary(summary, 1.0)
    out = capsys.readouterr().out
    assert f"worth it?  {ev['worth_it']}" in out and "baseline:  tfidf_lr (best baseline) macro_f1" in out

    # The registered model answers a request with the label the evaluation predicted (same label prompt, same scoring).
    import mlflow

    mlflow.set_tracking_uri(reg["tracking_uri"])
    served = mlflow.pyfunc.load_model(reg["model_uri"])
    asked = kept_eval[:4]
    said = served.predict(pd.DataFrame({"prompt": [r["messages"][-2]["content"] for r in asked]}))
    assert [s["label"] for s in said] == [p["tuned"] for p in predictions[:4]]
    for answer in said:  # with its probabilities over the whole label set
        assert set(answer["probabilities"]) == set(ev["labels"]) and abs(sum(answer["probabilities"].values()) - 1) < 1e-4
        assert max(answer["probabilities"], key=answer["probabilities"].get) == answer["label"]
