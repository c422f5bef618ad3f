"""FEWTUNE_HOME: where converted base models, the MLflow registry and the webhook store live (default
~/.cache/fewtune)."""

from __future__ import annotations

import os
from pathlib import Path


def fewtune_home() -> Path:
    home = Path(os.environ.get("FEWTUNE_HOME", Path.home() / ".cache" / "fewtune"))
    home.mkdir(parents=True, exist_ok=True)
    return home
