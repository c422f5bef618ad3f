"""Faults injected into the real flow: transient failures retried, user errors not, `kill -9` at every stage and
damaged stage folders, each followed by a re-run that resumes from what finished and never reuses a broken part."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tasks.common.records import DataError, read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "fault_run.py"


def _config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    write_jsonl(tmp_path / "train.jsonl", read_jsonl(REPO / "examples/support/train.jsonl")[:48])
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(REPO / "examples/support/test.jsonl")[:6])
    write_jsonl(tmp_path / "probe.jsonl", read_jsonl(REPO / "examples/probe/general.jsonl")[:4])
    cfg = {
        "name": "faults",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "probe": "probe.jsonl"},
        "model": {"base": str(model_dir), "max_length": 96, "dtype": "float32"},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "evals_per_epoch": 2},
        "evaluate": {"max_new_tokens": 6, "batch_size": 8, "memorization_rows": 0, "probe_max_rows": 4,
                     "probe_max_new_tokens": 4},
        "register": {"model_name": f"faults-{uuid.uuid4().hex[:8]}", "min_gain": -1.0,
                     "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "run": {"runs_dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage(tmp_path: Path, name: str) -> Path:
    (folder,) = (tmp_path / "runs" / ".cache").glob(f"{name}-*")
    return folder


def _result_stamp(tmp_path: Path, name: str) -> int | None:
    result = _stage(tmp_path, name) / "result.json"
    return result.stat().st_mtime_ns if result.exists() else None


def _run(config: Path, point: str, env: dict[str, str], log: Path) -> str:
    proc = subprocess.run([sys.executable, str(CHILD), str(config), point], env=env, capture_output=True, text=True,
                          timeout=900, cwd=config.parent)
    log.write_text(proc.stdout + proc.stderr)
    expected = 0 if point == "none" else -9
    assert proc.returncode == expected, f"{point}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def _versions(cfg_path: Path) -> list:
    from mlflow import MlflowClient

    reg = yaml.safe_load(cfg_path.read_text())["register"]
    client = MlflowClient(reg["tracking_uri"])
    found = client.search_model_versions(f"name = '{reg['model_name']}'")
    return [client.get_model_version(reg["model_name"], v.version) for v in found]


def test_kill_9_in_every_stage_then_damaged_folders_each_rerun_resumes(tmp_path, tiny_model_dir, local_prefect_server):
    config = _config(tmp_path, tiny_model_dir)
    env = local_prefect_server.env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    # kill -9 while scoring: validation finished, the scores parquet is half written, no result.
    _run(config, "score", env, tmp_path / "1-score.log")
    validated = _result_stamp(tmp_path, "validate")
    assert validated is not None and _result_stamp(tmp_path, "score") is None

    # Re-run, killed right after the first training checkpoint: validation reused, scoring redone whole.
    _run(config, "train", env, tmp_path / "2-train.log")
    assert _result_stamp(tmp_path, "validate") == validated
    scored = _result_stamp(tmp_path, "score")
    import pyarrow.parquet as pq

    assert pq.read_table(_stage(tmp_path, "score") / "scores.parquet").num_rows > 0
    checkpoints = list((_stage(tmp_path, "train") / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and _result_stamp(tmp_path, "train") is None

    # Re-run, killed in evaluation: training resumed from its checkpoint instead of starting over.
    _run(config, "evaluate", env, tmp_path / "3-evaluate.log")
    assert _result_stamp(tmp_path, "score") == scored
    train = json.loads((_stage(tmp_path, "train") / "result.json").read_text())
    assert train["resumed_from"] and Path(train["resumed_from"]).name == checkpoints[0].name
    trained = _result_stamp(tmp_path, "train")
    assert _result_stamp(tmp_path, "evaluate") is None

    # Re-run, killed after the registry created the version and before any alias moved.
    _run(config, "register", env, tmp_path / "4-register.log")
    assert _result_stamp(tmp_path, "train") == trained
    evaluated = _result_stamp(tmp_path, "evaluate")
    (pending,) = _versions(config)
    assert pending.tags["registration"] == "pending" and not pending.aliases
    assert "decision_key" in pending.tags and "gate" in pending.tags  # created whole, with its decision

    # A clean re-run finishes that version: no second version, aliases as its gate decided.
    _run(config, "none", env, tmp_path / "5-rerun.log")
    assert [_result_stamp(tmp_path, s) for s in ("validate", "score", "train", "evaluate")] == [
        validated, scored, trained, evaluated]
    (version,) = _versions(config)
    assert version.version == pending.version and version.tags["registration"] == "complete"
    promoted = version.tags["promoted"] == "true"
    assert set(version.aliases) == ({"challenger", "champion"} if promoted else {"challenger"})

    # Damage finished stage folders the way a crash of the machine can: a truncated parquet, a lost adapter
    # file, a truncated result. The re-run notices each, redoes exactly those stages and finishes.
    score_dir, train_dir, eval_dir = (_stage(tmp_path, s) for s in ("score", "train", "evaluate"))
    parquet = score_dir / "scores.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])
    (weights,) = (train_dir / "adapter").glob("adapter_model.*")
    weights.unlink()
    result = eval_dir / "result.json"
    result.write_text(result.read_text()[:200])
    out = _run(config, "none", env, tmp_path / "6-damaged.log")
    assert "scores.parquet has 100 bytes" in out and f"adapter/{weights.name} is missing" in out
    assert pq.read_table(parquet).num_rows > 0 and weights.is_file()
    assert json.loads(result.read_text())["n_examples"] == 6
    assert _result_stamp(tmp_path, "validate") == validated
    versions = _versions(config)
    assert all(v.tags["registration"] == "complete" for v in versions)
    for v in versions:  # an alias never points at a version its gate refused
        assert not v.aliases or "challenger" in v.aliases
        assert "champion" not in v.aliases or v.tags["promoted"] == "true"


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _flaky(monkeypatch, failure: Exception, times: int) -> list[int]:
    """Make the score stage's scoring raise `failure` the first `times` calls; returns the call log."""
    import flows.stages as stages

    calls: list[int] = []
    real = stages.score_rows

    def score_rows(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "score_rows", score_rows)
    return calls


def test_a_transient_failure_is_retried_and_the_run_completes(tmp_path, tiny_model_dir, prefect_harness, monkeypatch):
    from flows.finetune import finetune

    calls = _flaky(monkeypatch, ConnectionResetError("connection reset by peer"), times=1)
    summary = finetune(config_path=str(_config(tmp_path, tiny_model_dir, train={"max_steps": 2})))
    assert len(calls) == 2  # failed once, retried once, then the run went on to the end
    assert summary["register"]["version"] and (Path(summary["run_dir"]) / "eval_results.json").is_file()


def test_a_user_error_is_not_retried(tmp_path, tiny_model_dir, prefect_harness, monkeypatch):
    from flows.finetune import finetune

    calls = _flaky(monkeypatch, DataError("train.jsonl", "row 3: no answer", fix="add the answer"), times=5)
    with pytest.raises(DataError, match="row 3: no answer"):
        finetune(config_path=str(_config(tmp_path, tiny_model_dir, train={"max_steps": 2})))
    assert len(calls) == 1
    assert not list((tmp_path / "runs" / ".cache").glob("train-*"))  # nothing after the failed stage ran
