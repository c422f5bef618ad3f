"""Shared test setup: fully offline, a throw-away FEWTUNE_HOME, and a tiny local base model."""

from __future__ import annotations

import atexit
import os
import shutil
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

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Llama + ChatML tokenizer that mimics the real base model; built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def real_base_model():
    """The embedded SmolLM2-135M-Instruct, resolved from the user's FEWTUNE_HOME (converted there once)."""
    from tasks.models import resolve_base_model

    os.environ["FEWTUNE_HOME"] = USER_FEWTUNE_HOME
    try:
        return resolve_base_model("smollm2-135m-instruct")
    finally:
        os.environ["FEWTUNE_HOME"] = _home


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
