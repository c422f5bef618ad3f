"""Shared test setup: fully offline, a throw-away FEWTUNE_HOME, and a tiny local base model."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Tests write tracking data and caches into a throw-away home. The user's own home (where `make setup` converted
# the embedded base model) is kept for the `slow` tests, which read the real model from it.
USER_FEWTUNE_HOME = os.environ.get("FEWTUNE_HOME", str(Path.home() / ".cache" / "fewtune"))
_home = tempfile.mkdtemp(prefix="fewtune-home-")
os.environ["FEWTUNE_HOME"] = _home
atexit.register(shutil.rmtree, _home, ignore_errors=True)

# The rouge_l metric's `rouge_score` imports absl, whose logging handler keeps the sys.stderr of the moment and closes
# that stream when logging is reconfigured (Prefect configures logging when first imported). Under pytest's output
# capture that stream is a capture buffer still in use, and a later test fails with "I/O operation on closed file".
# fewtune never attaches that handler to a logger: point it at the process's own stderr, which it never closes.
from absl import logging as absl_logging  # noqa: E402

from tiny_model import build_tiny_model  # noqa: E402

absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Llama + ChatML tokenizer that mimics the real base model; built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny models are far too small to gain from threads, and on a busy
    machine threads cost up to 10x. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_base_model():
    """The embedded SmolLM2-135M-Instruct, resolved from the user's FEWTUNE_HOME (converted there once)."""
    from tasks.common.models import resolve_base_model

    os.environ["FEWTUNE_HOME"] = USER_FEWTUNE_HOME
    try:
        return resolve_base_model("smollm2-135m-instruct")
    finally:
        os.environ["FEWTUNE_HOME"] = _home


@pytest.fixture(scope="session")
def local_prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on 127.0.0.1 (own home and SQLite database), stopped by pid at the end."""
    from prefect_server import LocalPrefectServer

    server = LocalPrefectServer(tmp_path_factory.mktemp("prefect-server")).start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
