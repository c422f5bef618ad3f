"""The whole flow end to end under a Prefect test server, on a tiny in-process model and a slice of the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.data import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
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
        cfg[section][field] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flow_end_to_end_and_cached_rerun(tmp_path, tiny_model_dir, prefect_server):
    import mlflow
    from mlflow import MlflowClient

    from flows.finetune import finetune
    from tasks.register import tracking_uri

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

    assert summary["score"]["rows"] == 48
    assert summary["train"]["train_rows"] + summary["train"]["validation_rows"] == 48
    assert summary["train"]["best_val_loss"] is not None
    ev = summary["evaluate"]
    assert ev["n_examples"] == 8
    for side in ("baseline", "tuned"):
        assert set(ev[side]) >= {"exact_match", "rouge_l", "eval_ppl", "probe_ppl"}
    # Training on the eval set's domain lowers the perplexity of its reference answers.
    assert ev["tuned"]["eval_ppl"] < ev["baseline"]["eval_ppl"]
    assert len(read_jsonl(run_dir / "predictions.jsonl")) == 8

    reg = summary["register"]
    assert reg["promoted"] is (ev["gain"] > -1.0)
    client = MlflowClient(reg["tracking_uri"])
    assert reg["tracking_uri"] == tracking_uri_for(tmp_path, config)
    version = client.get_model_version_by_alias("flowtest-model", "challenger")
    assert str(version.version) == reg["version"]
    assert version.tags["train_key"]

    # The registered pyfunc answers prompts with the tuned adapter.
    mlflow.set_tracking_uri(reg["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/flowtest-model@challenger")
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


def tracking_uri_for(tmp_path, config):
    from flows.config import load_config
    from tasks.register import tracking_uri

    return tracking_uri(load_config(config))


def test_flow_stops_with_clear_message_on_unusable_data(tmp_path, tiny_model_dir, prefect_server):
    from flows.finetune import finetune
    from tasks.data import DataError

    config = _write_config(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text('{"id": 1, "messages": "not a list"}\n{"oops": true}\n')
    with pytest.raises(DataError) as info:
        finetune(config_path=str(config))
    assert "train.jsonl" in str(info.value)
