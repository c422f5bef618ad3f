"""The whole flow end to end under a Prefect test server, on a tiny in-process model and a slice of the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.finetune import finetune
from tasks.common.records import SOURCES, DataError, read_jsonl, write_jsonl
from tasks.common.registry import tracking_uri
from tasks.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # the default 30 s is too short on a busy 2-core machine
        yield


def _write_config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    train = read_jsonl(REPO / "examples/support/train.jsonl")[:48]
    test = read_jsonl(REPO / "examples/support/test.jsonl")[:8]
    probe = read_jsonl(REPO / "examples/probe/general.jsonl")[:6]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    write_jsonl(tmp_path / "probe.jsonl", probe)
    # One broken line: it must end up in quarantine, not stop the run.
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"id": "broken", "messages": [{"role": "user", "content": "cut off\n')
    cfg = {
        "name": "flowtest",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "probe": "probe.jsonl"},
        "model": {"base": str(model_dir), "max_length": 96},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "evals_per_epoch": 2},
        "evaluate": {"max_new_tokens": 8, "batch_size": 8},
        "register": {"model_name": "flowtest-model", "min_gain": -1.0},
        "run": {"runs_dir": str(tmp_path / "runs"), "name": "first"},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        cfg.setdefault(section, {})[field] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flow_end_to_end_and_cached_rerun(tmp_path, tiny_model_dir, prefect_server):
    import mlflow
    from mlflow import MlflowClient

    config = _write_config(tmp_path, tiny_model_dir)
    summary = finetune(config_path=str(config))

    run_dir = Path(summary["run_dir"])
    assert run_dir == tmp_path / "runs" / "first"
    for name in ("summary.json", "eval_results.json", "predictions.jsonl", "config.yaml", "scores.parquet", "train_log.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)

    quarantined = read_jsonl(run_dir / "data" / "quarantine.jsonl")
    assert [q["line"] for q in quarantined] == [49]
    v = summary["validate"]
    assert v["files"]["train"]["rows_in"] == 49 and v["files"]["train"]["rows_kept"] == 48
    assert v["train_rows"] == 48 and v["eval_rows"] == 8
    assert (run_dir / "data_docs" / "index.html").is_file() and (run_dir / "data" / "warnings.jsonl").is_file()
    from prefect.artifacts import Artifact

    table = Artifact.get("flowtest-validation")  # counts per check, as a Prefect table artifact
    assert table is not None and table.type == "table"
    assert {"check": "load", "severity": "row error", "flagged": 1, "quarantined": 1, "warned": 0} in json.loads(table.data)
    health = Artifact.get("flowtest-health")  # the training-health checks as a Prefect markdown artifact
    assert health is not None and health.type == "markdown" and "# Training health of `first`" in health.data
    assert [c["name"] for c in summary["health"]["checks"]] == ["eval_perplexity", "loss_gap", "convergence", "baseline", "trainable_tokens"]

    assert summary["score"]["rows"] == 48
    assert summary["train"]["train_rows"] + summary["train"]["validation_rows"] == 48
    assert summary["train"]["best_val_loss"] is not None
    ev = summary["evaluate"]
    assert ev["n_examples"] == 8
    for side in ("baseline", "tuned"):
        assert set(ev[side]) >= {"exact_match", "rouge_l", "fact_accuracy", "eval_ppl"}
    assert ev["primary_metric"] == "fact_accuracy"  # auto: the shop's answers carry hours and prices
    assert set(ev["forgetting"]["signals"]) == {"general_ppl", "kl_general", "kl_task", "general_flips"}  # shipped probe
    # Training on the eval set's domain lowers the perplexity of its reference answers.
    assert ev["tuned"]["eval_ppl"] < ev["baseline"]["eval_ppl"]
    assert len(read_jsonl(run_dir / "predictions.jsonl")) == 8

    reg = summary["register"]
    statuses = {c["name"]: c["status"] for c in reg["gate"]["criteria"]}
    assert reg["promoted"] is all(s in ("pass", "not_applicable", "off") for s in statuses.values()), statuses
    client = MlflowClient(reg["tracking_uri"])
    assert reg["tracking_uri"] == tracking_uri_for(tmp_path, config)
    version = client.get_model_version_by_alias("flowtest-model", "challenger")
    assert str(version.version) == reg["version"]
    assert version.tags["train_key"]

    # The registered pyfunc answers prompts with the tuned adapter.
    mlflow.set_tracking_uri(reg["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/flowtest-model@challenger")
    import pandas as pd

    answers = model.predict(pd.DataFrame({"prompt": ["When are you open on Sundays?"]}))
    assert len(answers) == 1 and isinstance(answers[0], str)

    # Same data and config: every stage is a cache hit; nothing is retrained and no new version is registered.
    train_result = next((tmp_path / "runs" / ".cache").glob("train-*/result.json"))
    stamp = train_result.stat().st_mtime_ns
    again = finetune(config_path=str(config), overrides=["run.name=second"])
    assert train_result.stat().st_mtime_ns == stamp
    assert again["evaluate"] == summary["evaluate"]
    assert again["register"]["version"] == reg["version"]
    assert (tmp_path / "runs" / "second" / "adapter" / "adapter_config.json").is_file()


def test_flow_with_augmentation_keeps_provenance_and_is_cached(tmp_path, tiny_model_dir, prefect_server):
    config = _write_config(
        tmp_path, tiny_model_dir, register__enabled=False, augment__enabled=True, augment__self_distill="add",
        augment__self_distill_max_rows=8, augment__paraphrase={"n": 1, "max_rows": 8}, augment__max_new_tokens=8,
    )
    summary = finetune(config_path=str(config))
    run_dir = Path(summary["run_dir"])
    aug = summary["augment"]
    for name in ("self_distilled", "paraphrase"):
        t = json.loads((run_dir / "augment_report.json").read_text())["techniques"][name]
        assert t["generated"] == 8 and t["kept"] + t["rejected"] + t["over_budget"] == 8
        assert aug["techniques"][name]["kept"] == t["kept"]
    assert (run_dir / "augment_report.md").read_text().startswith("# Augmentation")
    rows = read_jsonl(run_dir / "data" / "augmented.jsonl")
    gold = read_jsonl(run_dir / "data" / "train.jsonl")
    assert len(rows) == aug["rows"] == summary["train"]["train_rows"] + summary["train"]["validation_rows"]
    assert [r["id"] for r in rows if r["source"] == "gold"] == [r["id"] for r in gold]  # add mode: every gold row stays
    assert all(r["source"] in SOURCES and (r["parent_id"] in {g["id"] for g in gold}) == (r["source"] != "gold") for r in rows)
    assert all(r["source"] == "gold" for r in read_jsonl(run_dir / "data" / "eval.jsonl"))  # eval never augmented
    assert len(read_jsonl(run_dir / "data" / "augment_rejected.jsonl")) == sum(t["rejected"] for t in aug["techniques"].values())
    html = (run_dir / "report.html").read_text()
    assert '<h2 id="augmentation">Augmentation</h2>' in html and "self_distilled (add)" in html and "why rejected" in html

    augment_result = next((tmp_path / "runs" / ".cache").glob("augment-*/result.json"))
    stamp = augment_result.stat().st_mtime_ns
    again = finetune(config_path=str(config), overrides=["run.name=second"])
    assert augment_result.stat().st_mtime_ns == stamp and again["augment"] == aug


def tracking_uri_for(tmp_path, config):
    return tracking_uri(load_config(config))


def test_flow_stops_with_clear_message_on_unusable_data(tmp_path, tiny_model_dir, prefect_server):
    config = _write_config(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text('{"id": 1, "messages": "not a list"}\n{"oops": true}\n')
    with pytest.raises(DataError) as info:
        finetune(config_path=str(config))
    assert "train.jsonl" in str(info.value)
