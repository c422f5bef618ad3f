"""Registration as a separate process: killed at a chosen point, or racing another one; a real `mlflow server`; and
the hand-built evaluations the promotion gate reads (real registration of real tiny LoRA adapters).

`python tests/register_helpers.py JOB.pkl` runs one `register_model` from a job written by `start_child`. The job
may name a point to SIGKILL itself at, found by patching the running code in that process only:
  - `logged`:  the model is logged, the version not created yet (`versions.create` kills);
  - `created`: the version exists with its tags, no alias moved yet (`versions.finish` kills);
  - `aliased`: right after the first alias was set (`MlflowClient.set_registered_model_alias` kills after it ran).
A job may also wait at a barrier (a folder where every racer leaves a file) before registering (`barrier`), or just
before creating its version (`barrier_at_create`), so that racing processes really overlap.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
ROWS = 8


def echo_model():
    """A pyfunc model that answers with its input: the model of versions built by hand in the shape of earlier
    releases' versions."""
    from mlflow.pyfunc import PythonModel

    class Echo(PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    return Echo()


def make_adapter(base: Path | str, out: Path, seed: int) -> str:
    """A real LoRA adapter of the tiny model with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    tuned.save_pretrained(out)
    return str(out)


def config(tracking_uri: str | None = None, **register: Any):
    from tasks.config import FewtuneConfig

    return FewtuneConfig(name="versions", data={"train": "-"}, model={"dtype": "float32", "max_length": 96},
                         evaluate={"max_new_tokens": 6, "bootstrap_samples": 200},
                         register={"model_name": "versions-model", "tracking_uri": tracking_uri, **register})


def evaluation(folder: Path, score: float) -> dict[str, Any]:
    """An evaluation whose task gain (0.1 -> `score`) and forgetting and memorization pass the default gate, with
    row scores (`predictions.jsonl`) that a later run's champion comparison reads back from the registry."""
    from gate_helpers import forgetting, memorization

    folder.mkdir(parents=True, exist_ok=True)
    scores = [round(score + (i % 3 - 1) * 0.01, 4) for i in range(ROWS)]
    predictions = folder / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": f"r{i}", "scores": {"tuned": {"rouge_l": s}}}) + "\n"
                                   for i, s in enumerate(scores)))
    gain = score - 0.1
    return {"task": "generation", "primary_metric": "rouge_l", "n_examples": ROWS, "baseline": {"rouge_l": 0.1},
            "tuned": {"rouge_l": score}, "gain": gain,
            "intervals": {"rouge_l": {"delta": gain, "low": gain - 0.05, "high": gain + 0.05, "n": ROWS}},
            "generation": {"dtype": "float32"}, "forgetting": forgetting(), "memorization": memorization(),
            "predictions_path": str(predictions)}


def register(cfg, ev: dict[str, Any], base: str, adapter: str, train_key: str, run_name: str = "run"):
    from tasks.register import register_model

    return register_model(cfg, run_name=run_name, adapter_path=adapter, base_path=base, base_spec=base, evaluation=ev,
                          lineage={"train_key": train_key, "data_train_hash": "t", "data_eval_hash": "e", "run_name": run_name},
                          system_prompt=None, eval_records=[])


def child_env(home: Path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "PATH")}
    return {**keep, "FEWTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), **extra}


def start_child(job: dict[str, Any], folder: Path, home: Path) -> subprocess.Popen:
    """Run one registration in a new Python process; its result goes to `folder/result.json`, its log to
    `folder/child.log`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "job.pkl", "wb") as f:
        pickle.dump({**job, "result": str(folder / "result.json")}, f)
    log = open(folder / "child.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(folder / "job.pkl")],
                            env=child_env(home), stdout=log, stderr=subprocess.STDOUT)


def wait_child(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> dict[str, Any] | None:
    """The child's exit status must be a clean exit or SIGKILL; returns its result (None when it was killed)."""
    code = proc.wait(timeout=timeout)
    log = (folder / "child.log").read_text(errors="replace")
    assert code in (0, -signal.SIGKILL), f"registration process exited {code}:\n{log[-4000:]}"
    return json.loads((folder / "result.json").read_text()) if code == 0 else None


def _barrier(folder: Path, me: str, parties: int, timeout: float = 180) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / me).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {folder}: {len(list(folder.iterdir()))} of {parties} arrived")
        time.sleep(0.02)


def _kill_at(point: str) -> None:
    from mlflow import MlflowClient

    from tasks.register import versions

    def die(*_a: Any, **_k: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "logged":
        versions.create = die
    elif point == "created":
        versions.finish = die
    elif point == "aliased":
        original = MlflowClient.set_registered_model_alias

        def set_then_die(self, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            die()

        MlflowClient.set_registered_model_alias = set_then_die
    else:
        raise ValueError(f"unknown kill point {point!r}")


def _wait_before_create(folder: Path, me: str, parties: int) -> None:
    from tasks.register import versions

    create = versions.create

    def wait_then_create(*args: Any, **kwargs: Any):
        _barrier(folder, me, parties)
        return create(*args, **kwargs)

    versions.create = wait_then_create


def child_main(job_path: str) -> None:
    import logging

    job = pickle.loads(Path(job_path).read_bytes())
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    if job.get("kill_at"):
        _kill_at(job["kill_at"])
    if job.get("barrier_at_create"):
        _wait_before_create(Path(job["barrier_at_create"]), job["me"], job["parties"])
    if job.get("barrier"):
        _barrier(Path(job["barrier"]), job["me"], job["parties"])
    reg = register(job["cfg"], job["evaluation"], job["base"], job["adapter"], job["train_key"], job.get("run_name", "run"))
    Path(job["result"]).write_text(json.dumps(reg.to_dict()))


# ---------------------------------------------------------------------------------------------------------------
# A real tracking server


def start_mlflow_server(folder: Path, log: Path, workers: int = 2):
    """`mlflow server` on a free loopback port, with a SQLite backend and proxied artifacts, both under `folder`;
    returns (process, URL) once /health answers."""
    import httpx

    from prefect_server import free_port, start_process, wait_until

    port = free_port()
    proc = start_process([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                          "--artifacts-destination", str(folder / "artifacts"), "-h", "127.0.0.1", "-p", str(port),
                          "-w", str(workers)], child_env(folder), log, cwd=folder)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
        return httpx.get(f"{url}/health", timeout=5).status_code == 200

    wait_until(up, 120, f"mlflow server (log: {log})", interval=0.5)
    return proc, url


if __name__ == "__main__":
    child_main(sys.argv[1])
