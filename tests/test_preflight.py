"""The whole config is checked before any work (every problem at once), and hub ids are fingerprinted by the
revision that will be read."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.cli.common import EXIT_USER_ERROR
from tasks.common.cache import source_fingerprint
from tasks.common.models import resolve_base_model
from tasks.config import ConfigError, FewtuneConfig
from tasks.doctor.preflight import preflight, preflight_findings


def write_config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "pre", **sections}))
    return path


def test_every_problem_is_reported_at_once_before_any_work(tmp_path, capsys):
    """Missing data files, a missing base model, QLoRA without CUDA and an uninstalled tracker: one message naming
    each field and its fix, exit code 2, and nothing started (no run folder, no Prefect server)."""
    import torch

    runs = tmp_path / "runs"
    config = write_config(
        tmp_path,
        data={"train": "missing/train.jsonl", "eval": "missing/test.jsonl"},
        model={"base": str(tmp_path / "no-such-model")},
        train={"method": "qlora", "report_to": ["wandb"]},
        run={"runs_dir": str(runs)},
        register={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    start = time.perf_counter()
    code = main(["run", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == EXIT_USER_ERROR and "Traceback" not in out
    assert time.perf_counter() - start < 30  # no server, no model loading
    assert out.startswith("error: the configuration cannot run as it is")
    assert f"data.train: {tmp_path / 'missing/train.jsonl'}: no such file or folder" in out
    assert f"data.eval: {tmp_path / 'missing/test.jsonl'}: no such file or folder" in out
    assert f"base model: {tmp_path / 'no-such-model'}: no such model folder or file" in out
    if not torch.cuda.is_available():
        assert "train.method qlora: " in out  # bitsandbytes missing, or present without CUDA
    if importlib.util.find_spec("wandb") is None:
        assert "trackers: train.report_to lists wandb, not installed" in out
    assert out.count("    fix: ") >= 3
    assert not runs.exists()


def test_a_runnable_config_passes(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    cfg = FewtuneConfig(data={"train": str(tmp_path / "train.jsonl")}, model={"base": str(tiny_model_dir)},
                        run={"runs_dir": str(tmp_path / "runs")},
                        register={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    preflight(cfg)  # raises on any problem
    assert {f.check for f in preflight_findings(cfg)} >= {"data.train", "data.eval", "base model", "mlflow", "trackers"}


def test_the_flow_checks_before_its_first_stage(tmp_path, tiny_model_dir):
    """A deployment run (no CLI in front) stops on the same check before any stage folder is written."""
    from flows.finetune import finetune

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    config = write_config(tmp_path, data={"train": "train.jsonl", "probe": "gone.jsonl"},
                          model={"base": str(tiny_model_dir)}, run={"runs_dir": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match=r"data.probe: .*gone.jsonl: no such file or folder"):
        finetune.fn(config_path=str(config))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Hub revisions: a local Hugging Face cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>).


def cache_revision(cache: Path, kind: str, repo: str, commit: str, files: dict[str, str]) -> None:
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_dataset_fingerprint_follows_its_revision(hub_cache):
    rows = {"train.jsonl": json.dumps({"prompt": "q", "completion": "a"}) + "\n"}
    cache_revision(hub_cache, "dataset", "acme/tickets", "a" * 40, rows)
    first = source_fingerprint("acme/tickets:train")
    assert source_fingerprint("acme/tickets:train") == first  # same revision: same key, the stages are reused
    cache_revision(hub_cache, "dataset", "acme/tickets", "b" * 40, rows)  # a new commit, same file names
    assert source_fingerprint("acme/tickets:train") != first
    # Not resolvable (not cached, hub offline): never a key another revision could share.
    assert source_fingerprint("acme/unknown") != source_fingerprint("acme/unknown")


def test_hub_model_fingerprint_follows_its_revision(hub_cache):
    cache_revision(hub_cache, "model", "acme/tiny-llm", "c" * 40, {"config.json": "{}"})
    first = resolve_base_model("acme/tiny-llm")
    assert not first.local and resolve_base_model("acme/tiny-llm").fingerprint == first.fingerprint
    cache_revision(hub_cache, "model", "acme/tiny-llm", "d" * 40, {"config.json": "{}"})
    assert resolve_base_model("acme/tiny-llm").fingerprint != first.fingerprint


def test_offline_hub_dataset_that_is_not_cached_is_a_preflight_problem(hub_cache, tmp_path, tiny_model_dir):
    cfg = FewtuneConfig(data={"train": "acme/not-cached"}, model={"base": str(tiny_model_dir)},
                        run={"runs_dir": str(tmp_path / "runs")}, register={"enabled": False})
    with pytest.raises(ConfigError, match="data.train: acme/not-cached: not in the local Hugging Face cache"):
        preflight(cfg)
    cache_revision(hub_cache, "dataset", "acme/not-cached", "e" * 40, {"train.jsonl": "{}\n"})
    preflight(cfg)
