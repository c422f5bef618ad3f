"""MLflow registry helpers shared by training (incremental mode reads the champion), registration and `doctor`:
the tracking URI, the alias names, quiet logging, and the code version recorded with every run."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from tasks.common.home import fewtune_home
from tasks.config import ConfigError, FewtuneConfig

CHAMPION = "champion"

CHALLENGER = "challenger"

HISTORY_TAG = "champion_history"

REPO_ROOT = Path(__file__).resolve().parents[2]

class RegistryError(ConfigError):
    """A registry operation that cannot be done (unknown model or version, nothing to roll back to)."""

def tracking_uri(cfg: FewtuneConfig) -> str:
    return cfg.register_.tracking_uri or f"sqlite:///{fewtune_home() / 'mlflow.db'}"

def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)

def code_version() -> str:
    """The git commit of the code (with `-dirty` when it has local changes), or `unknown` outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
