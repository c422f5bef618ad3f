"""FEWTUNE_HOME: where converted base models, the MLflow registry and the webhook store live (default
~/.cache/fewtune)."""

from __future__ import annotations

import os
from pathlib import Path


def fewtune_home() -> Path:
    # An empty FEWTUNE_HOME (`FEWTUNE_HOME= fewtune run`) counts as unset, not as the current folder.
    home = Path(os.environ.get("FEWTUNE_HOME") or Path.home() / ".cache" / "fewtune")
    home.mkdir(parents=True, exist_ok=True)
    return home
