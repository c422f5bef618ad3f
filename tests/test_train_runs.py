"""Training, part 2: early stopping and the over-memorization guard, best-checkpoint reload, kill -9 resume,
determinism, replay, incremental mode, several processes, QLoRA and out-of-memory retry (CUDA only).
Part 1: tests/test_train_plan_data.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, curve, demo_rows, history, make_cfg

from tasks.common.records import training_split, write_jsonl
from tasks.common.registry import tracking_uri
from tasks.config import FewtuneConfig
from tasks.train import last_checkpoint, resolve_init_adapter, train_adapter, train_adapter_launched

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


# ----------------------------------------------------------------------------------------------------------------
# Early stopping, the over-memorization guard, best checkpoint


def conflicting_rows() -> list[dict]:
    """The validation slice's answers contradict the training answers to the same question: validation loss first
    falls (the shared answer format is learnt), then rises as the training answer is memorised."""
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": "Where is the shop?"}, {"role": "assistant", "content": ""}],
         "label": None, "source": "gold", "parent_id": None}
        for i in range(24)
    ]
    _, val = training_split(rows, 0.25, 42)
    val_ids = {r["id"] for r in val}
    for r in rows:
        r["messages"][1]["content"] = "Next to the station." if r["id"] in val_ids else "On Main Street."
    return rows


def conflict_cfg(**extra) -> FewtuneConfig:
    train = dict(method="lora", epochs=8, batch_size=4, learning_rate=1e-2, evals_per_epoch=1, validation_fraction=0.25,
                 replay_fraction=0, warmup_ratio=0)
    return make_cfg(**(train | extra))


@pytest.fixture(scope="module")
def guard_run(tiny_model_dir, tmp_path_factory):
    cfg = conflict_cfg(early_stopping_patience=3, overmemorization_patience=2)
    return train_adapter(conflicting_rows(), cfg, str(tiny_model_dir), tmp_path_factory.mktemp("guard"))


def test_over_memorization_guard_stops_on_rising_validation_perplexity(guard_run):
    log = history(guard_run)
    losses = [h["eval_loss"] for h in log if "eval_loss" in h]
    assert guard_run.stop_reason == "over_memorization" and guard_run.stopped_early
    assert guard_run.steps < 8 * 5  # 8 epochs of 5 steps were planned
    assert losses[-1] > losses[-2] > losses[-3]  # risen at the last two evaluations
    stop = log[-1]
    assert stop["event"] == "stop" and stop["reason"] == "over_memorization"
    assert stop["validation_ppl"][-1] == pytest.approx(__import__("math").exp(losses[-1]), rel=1e-3)
    saved = json.loads((Path(guard_run.adapter_path).parent / "train_result.json").read_text())
    assert saved["stop_reason"] == "over_memorization"


def test_early_stopping_stops_when_validation_stops_improving(tiny_model_dir, tmp_path):
    cfg = conflict_cfg(early_stopping_patience=2, overmemorization_patience=8)
    result = train_adapter(conflicting_rows(), cfg, str(tiny_model_dir), tmp_path)
    losses = [h["eval_loss"] for h in history(result) if "eval_loss" in h]
    assert result.stop_reason == "early_stopping" and result.steps < 8 * 5
    assert min(losses[-2:]) > min(losses[:-2])  # the last two evaluations did not improve on the best


def test_best_adapter_reloaded_equals_the_best_evaluation(guard_run):
    import torch
    from safetensors.torch import load_file

    log = history(guard_run)
    evals = [h for h in log if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert guard_run.best_step == best["step"] and guard_run.best_val_loss == pytest.approx(best["eval_loss"])
    assert guard_run.best_step < guard_run.steps  # training went on past the best point
    ckpts = Path(guard_run.adapter_path).parent / "checkpoints"
    saved = load_file(str(Path(guard_run.adapter_path) / "adapter_model.safetensors"))
    at_best = load_file(str(ckpts / f"checkpoint-{best['step']}" / "adapter_model.safetensors"))
    at_end = load_file(str(ckpts / f"checkpoint-{guard_run.steps}" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys() and saved
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert any(not torch.equal(saved[k], at_end[k]) for k in saved)


# ----------------------------------------------------------------------------------------------------------------
# Resume after kill -9, determinism


def _write_inputs(folder: Path, **train) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "rows.jsonl", demo_rows(40))
    cfg = {"name": "kill", "data": {"train": "-"}, "model": {"max_length": 64},
           "train": {"method": "lora", "epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "evals_per_epoch": 3,
                     "replay_fraction": 0, **train}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return ["--config", str(folder / "cfg.json"), "--train", str(folder / "rows.jsonl")]


def test_training_killed_mid_run_resumes_to_the_same_loss_curve(tiny_model_dir, tmp_path):
    args = _write_inputs(tmp_path) + ["--base", str(tiny_model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tasks.train", *args]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "straight")], cwd=REPO, env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while last_checkpoint(killed / "checkpoints") is None:
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = last_checkpoint(killed / "checkpoints")
    assert not (killed / "train_result.json").exists()

    again = subprocess.run(cmd + ["--out", str(killed)], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((killed / "train_result.json").read_text())
    full = json.loads((tmp_path / "straight" / "train_result.json").read_text())
    assert resumed["resumed_from"] is not None
    assert int(Path(resumed["resumed_from"]).name.split("-")[1]) >= int(Path(at_kill).name.split("-")[1])
    assert resumed["resumed_from"] != str(killed / "checkpoints" / f"checkpoint-{full['steps']}")  # not already done
    assert resumed["steps"] == full["steps"] and resumed["best_val_loss"] == full["best_val_loss"]
    a = curve(json.loads((tmp_path / "straight" / "train_log.json").read_text()))
    b = curve(json.loads((killed / "train_log.json").read_text()))
    assert len(a) > 4 and a == b  # same data order, same dropout, same losses


def test_same_seed_same_loss_curve_and_replay_mix(tiny_model_dir, tmp_path):
    rows = demo_rows(40)
    replay = [{"id": f"general-{i}", "messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."},
                                                   {"role": "assistant", "content": f"{i} is {'even' if i % 2 == 0 else 'odd'}."}]}
              for i in range(30)]
    cfg = make_cfg(method="lora", max_steps=6, batch_size=4, learning_rate=1e-3, evals_per_epoch=4)
    one = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "one", replay=replay)
    two = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "two", replay=replay)
    other = train_adapter(rows, make_cfg(**(cfg.train.model_dump() | {"seed": 7})), str(tiny_model_dir), tmp_path / "other",
                          replay=replay)
    assert curve(history(one)) == curve(history(two)) and len(curve(history(one))) >= 4
    assert curve(history(one)) != curve(history(other))

    # Replay: 10% of the mix from data.replay, the same rows for the same seed; never the validation slice.
    plan = json.loads(Path(one.plan_path).read_text())
    assert one.replay_rows == plan["replay_rows"] == 4  # 36 training rows -> 4 replay rows = 10% of 40
    assert plan["replay_source"] == one.replay_source == "data.replay" and "small data" in plan["reasons"]["replay_fraction"]
    assert set(plan["reasons"]) == {"method", "learning_rate", "epochs", "replay_fraction"}
    mixed = [json.loads(line)["id"] for line in (tmp_path / "one" / "replay.jsonl").read_text().splitlines()]
    assert mixed == [json.loads(line)["id"] for line in (tmp_path / "two" / "replay.jsonl").read_text().splitlines()]
    held = {json.loads(line)["id"] for line in Path(one.validation_path).read_text().splitlines()}
    assert len(mixed) == 4 and len(held) == one.validation_rows == 4 and not held & {r["id"] for r in replay}


# ----------------------------------------------------------------------------------------------------------------
# Incremental mode, several processes


def test_incremental_training_starts_from_the_champion(guard_run, tiny_model_dir, tmp_path):
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 64}, register={"model_name": "incremental-test"},
                        train={"init_adapter": "champion", "max_steps": 3, "batch_size": 4, "replay_fraction": 0})
    assert resolve_init_adapter(cfg) is None  # no champion yet: a fresh adapter

    class Answer(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return list(model_input["prompt"])

    mlflow.set_tracking_uri(tracking_uri(cfg))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Answer(), artifacts={"adapter": guard_run.adapter_path},
                                       registered_model_name="incremental-test")
    MlflowClient(tracking_uri(cfg)).set_registered_model_alias("incremental-test", "champion", info.registered_model_version)

    init = resolve_init_adapter(cfg)
    assert init is not None and "champion" in init.source
    result = train_adapter(demo_rows(24), cfg, str(tiny_model_dir), tmp_path, init_adapter=init.path)
    plan = json.loads(Path(result.plan_path).read_text())
    assert plan["method"] == "lora" and "incremental" in plan["reasons"]["method"]
    assert plan["learning_rate"] == pytest.approx(2e-5)
    start = load_file(str(Path(init.path) / "adapter_model.safetensors"))
    end = load_file(str(Path(result.adapter_path) / "adapter_model.safetensors"))
    b_keys = [k for k in start if "lora_B" in k]
    assert b_keys and all(start[k].abs().max() > 0 for k in b_keys)  # a fresh adapter would start at B = 0
    for k in b_keys:
        assert (end[k] - start[k]).abs().max() < 0.1 * start[k].abs().max()  # continued, not restarted


def test_accelerate_launch_runs_data_parallel_processes(tiny_model_dir, tmp_path):
    cfg = make_cfg(method="lora", max_steps=2, batch_size=4, num_processes=2, replay_fraction=0)
    result = train_adapter_launched(demo_rows(24), cfg, str(tiny_model_dir), tmp_path)
    assert result.steps == 2 and (Path(result.adapter_path) / "adapter_model.safetensors").is_file()
    # Two processes of 4 rows each per step: 8 rows a step, 20 training rows -> 3 steps an epoch.
    assert result.epochs_run == pytest.approx(2 / 3, abs=0.01)


# ----------------------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tiny_model_dir, tmp_path):
    result = train_adapter(demo_rows(40), make_cfg(method="qlora", max_steps=4, batch_size=4), str(tiny_model_dir), tmp_path)
    assert result.method == "qlora" and result.steps == 4
    assert json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.gpu
def test_cuda_out_of_memory_retries_with_half_the_micro_batch(tiny_model_dir, tmp_path):
    """Fill the GPU so that only a small micro-batch of long rows fits; training must finish with the same
    effective batch."""
    import torch

    long = " ".join(["The shop is open on weekdays and rents bikes by the day."] * 40)
    rows = [{"id": f"l{i}", "messages": [{"role": "user", "content": long}, {"role": "assistant", "content": long}],
             "label": None, "source": "gold", "parent_id": None} for i in range(80)]
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free - 600 * 2**20), dtype=torch.uint8, device="cuda")  # leave ~600 MiB
    try:
        cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 1024},
                            train={"method": "full", "max_steps": 2, "batch_size": 64, "replay_fraction": 0})
        result = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path)
    finally:
        del ballast
        torch.cuda.empty_cache()
    assert result.oom_retries >= 1 and result.batch_size < 64
    assert result.batch_size * result.gradient_accumulation == 64
