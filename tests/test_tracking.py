"""Trackers besides MLflow (`train.report_to`): TensorBoard event files from a real training run on the tiny model,
W&B in offline mode where installed, and a clear message when a listed tracker is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tasks.common.records import load_records
from tasks.common.tracking import check_trackers
from tasks.config import ConfigError, FewtuneConfig, load_config
from tasks.train import train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent


def make_cfg(report_to) -> FewtuneConfig:
    train = {"method": "lora", "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "evals_per_epoch": 4,
             "replay_fraction": 0, "report_to": report_to}
    return FewtuneConfig(data={"train": "-"}, model={"max_length": 64}, train=train)


def test_report_to_values_and_the_missing_package_message():
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(None).train.report_to == ["none"]
    with pytest.raises(ConfigError, match="`none` cannot be combined"):
        load_config(None, ["train.report_to=[none, tensorboard]"])
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=[comet]"])
    check_trackers(make_cfg(["none"]))  # nothing to install
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"(?s)lists wandb, but the package is not installed.*pip install 'fewtune\[tracking\]'"):
            check_trackers(make_cfg(["wandb"]))


def test_tensorboard_gets_the_training_curves(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'fewtune[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = load_records(REPO / "examples/support/train.jsonl").records[:24]
    result = train_adapter(rows, make_cfg(["tensorboard"]), str(tiny_model_dir), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/learning_rate"} <= set(scalars)
    log = json.loads((tmp_path / "train_log.json").read_text())
    logged = {e["step"]: e["eval_loss"] for e in log if "eval_loss" in e}
    written = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert written.keys() == logged.keys() and all(abs(written[s] - logged[s]) < 1e-5 for s in logged)
    assert result.steps == 4


def test_wandb_runs_offline_without_a_key(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional: pip install 'fewtune[tracking]'")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    rows = load_records(REPO / "examples/support/train.jsonl").records[:24]
    train_adapter(rows, make_cfg(["wandb"]), str(tiny_model_dir), tmp_path / "run")
    assert list((tmp_path / "wandb").rglob("offline-run-*"))
