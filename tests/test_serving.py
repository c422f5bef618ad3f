"""`mlflow models serve` answers for the registered champion as the in-process model does: a real server on loopback,
for the local SQLite registry, and for a tracking server's folder copied to another place with the training machine
(its base model folder, adapter and FEWTUNE_HOME) gone: the base is found again through its portable reference."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from register_helpers import start_mlflow_server

from tasks.common.portable import BASE_ENV
from tasks.config import FewtuneConfig
from tasks.register import register_model

from prefect_server import free_port, start_process, stop_process, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PROMPTS = ["When are you open on Sundays?", "Do you rent e-bikes?", "Where is the shop?"]


def adapter_for(base: Path, out: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    tuned.save_pretrained(out)
    return str(out)


def register_champion(cfg: FewtuneConfig, base: Path, adapter: str, evaluation: dict) -> str:
    reg = register_model(cfg, run_name="served", adapter_path=adapter, base_path=str(base), base_spec=str(base),
                         evaluation=evaluation, lineage={"train_key": "k", "data_train_hash": "t", "data_eval_hash": "e"},
                         system_prompt="You are the customer support assistant of Kestrel Cycles.")
    assert reg.promoted, reg.decision
    return f"models:/{reg.model_name}@champion"


def passing_evaluation() -> dict:
    from gate_helpers import forgetting, memorization

    metrics = {"rouge_l": 0.5}
    return {"task": "generation", "primary_metric": "rouge_l", "n_examples": 40, "baseline": {"rouge_l": 0.1},
            "tuned": metrics, "gain": 0.4, "intervals": {"rouge_l": {"delta": 0.4, "low": 0.3, "high": 0.5}},
            "generation": {"dtype": "float32"}, "forgetting": forgetting(), "memorization": memorization()}


def in_process(uri: str, tracking: str) -> list:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking)
    return list(mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": PROMPTS})))


def served(uri: str, env: dict[str, str], log: Path) -> list:
    port = free_port()
    proc = start_process([str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                          "-h", "127.0.0.1", "-p", str(port)], env, log)
    try:
        def up() -> bool:
            assert proc.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
            return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200

        wait_until(up, 300, f"mlflow models serve (log: {log})", interval=2)
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=300,
                            json={"dataframe_records": [{"prompt": p} for p in PROMPTS]})
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"]
    finally:
        stop_process(proc)
        assert proc.returncode is not None


def server_env(home: Path, tracking: str, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FEWTUNE_HOME": str(home), "MLFLOW_TRACKING_URI": tracking, "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.fixture()
def training_machine(tmp_path, tiny_model_dir, monkeypatch):
    """A base model folder and an adapter that exist only under `tmp_path/training-machine`."""
    machine = tmp_path / "training-machine"
    base = shutil.copytree(tiny_model_dir, machine / "base")
    monkeypatch.setenv("FEWTUNE_HOME", str(machine / "home"))
    return machine, base, adapter_for(base, machine / "adapter")


def test_mlflow_serve_answers_as_the_in_process_model(training_machine, tmp_path):
    machine, base, adapter = training_machine
    tracking = f"sqlite:///{machine / 'home' / 'mlflow.db'}"
    cfg = FewtuneConfig(name="served", data={"train": "-"}, model={"dtype": "float32", "max_length": 96},
                        evaluate={"max_new_tokens": 8}, register={"model_name": "served-model", "tracking_uri": tracking})
    uri = register_champion(cfg, base, adapter, passing_evaluation())
    want = in_process(uri, tracking)
    assert len(want) == len(PROMPTS) and all(isinstance(a, str) for a in want)
    assert served(uri, server_env(machine / "home", tracking), tmp_path / "serve.log") == want


def test_a_registry_behind_a_tracking_server_serves_from_another_machine(training_machine, tiny_model_dir, tmp_path):
    """Registered through tracking server A (SQLite backend, proxied artifacts in `A/artifacts`); A's folder copied to
    B and deleted, the training machine (its base model folder, adapter and FEWTUNE_HOME) deleted; a server on B and
    `mlflow models serve` with another copy of the base model (`FEWTUNE_BASE_MODEL`) answer as before the move."""
    machine, base, adapter = training_machine
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    proc, url = start_mlflow_server(a, tmp_path / "server-a.log", workers=1)
    try:
        cfg = FewtuneConfig(name="served", data={"train": "-"}, model={"dtype": "float32", "max_length": 96},
                            evaluate={"max_new_tokens": 8}, register={"model_name": "served-model", "tracking_uri": url})
        uri = register_champion(cfg, base, adapter, passing_evaluation())
        want = in_process(uri, url)
    finally:
        stop_process(proc)
    assert len(want) == len(PROMPTS) and all(isinstance(a, str) for a in want)
    assert list((a / "artifacts").rglob("adapter_model.safetensors")), "the adapter is not in the server's artifact store"

    shutil.copytree(a, b)
    shutil.rmtree(a)
    shutil.rmtree(machine)
    serving = tmp_path / "serving-machine"
    other_base = shutil.copytree(tiny_model_dir, serving / "base")
    proc, url_b = start_mlflow_server(b, tmp_path / "server-b.log", workers=1)
    try:
        env = server_env(serving / "home", url_b, **{BASE_ENV: str(other_base)})
        assert served(uri, env, tmp_path / "serve-b.log") == want
    finally:
        stop_process(proc)


def test_a_version_with_its_base_bundled_needs_nothing_but_the_registry(training_machine, monkeypatch):
    """`register.bundle_base`: the base weights are logged with the version, so it loads with the training machine's
    base folder and adapter gone and no FEWTUNE_BASE_MODEL, answering as before."""
    machine, base, adapter = training_machine
    tracking = f"sqlite:///{machine / 'home' / 'mlflow.db'}"
    cfg = FewtuneConfig(name="served", data={"train": "-"}, model={"dtype": "float32", "max_length": 96},
                        evaluate={"max_new_tokens": 8},
                        register={"model_name": "bundled-model", "tracking_uri": tracking, "bundle_base": True})
    uri = register_champion(cfg, base, adapter, passing_evaluation())
    want = in_process(uri, tracking)
    assert list((machine / "home" / "mlartifacts").rglob("base/model.safetensors")), "the base was not bundled"
    shutil.rmtree(base)
    shutil.rmtree(adapter)
    monkeypatch.delenv(BASE_ENV, raising=False)
    assert in_process(uri, tracking) == want
