"""The health checks over a run folder made by `fewtune run`, thresholds from its `config.yaml`.

Read by the health stage (`fewtune health RUN_DIR`, which may also count the trainable tokens) and by the report of
a run whose summary predates the health checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common.health_checks import HealthReport, assess
from tasks.config import ConfigError, FewtuneConfig


def read_json(path: Path) -> Any:
    """The JSON file's content, or None when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_config(run_dir: str | Path) -> FewtuneConfig:
    """The configuration a run folder was made with; a clear error when it is no run folder (no train_log.json) or
    its config.yaml is one this version of fewtune does not read."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "train_log.json").is_file():
        raise ConfigError(f"{run_dir / 'train_log.json'} not found: pass a run folder made by `fewtune run`, e.g. runs/demo-20261123-101500")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").is_file() else None
    try:
        return FewtuneConfig.model_validate(raw or {"data": {"train": "-"}})
    except ValueError as exc:  # pydantic's ValidationError
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: not a configuration this version of fewtune reads ({str(exc).splitlines()[0]})\n"
            "  fix: check the run folder, or rebuild it with `fewtune run`"
        ) from None


def assess_run_folder(
    run_dir: str | Path, cfg: FewtuneConfig | None = None, train_result: dict[str, Any] | None = None
) -> HealthReport:
    """Every check over a run folder: its training log, train result and plan, and evaluation results.
    `cfg`: the folder's configuration when already read (`run_config`); `train_result`: in place of the folder's
    train_result.json (e.g. with the trainable tokens counted)."""
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else run_config(run_dir)
    result = train_result if train_result is not None else read_json(run_dir / "train_result.json") or {}
    return assess(read_json(run_dir / "train_log.json") or [], read_json(run_dir / "eval_results.json"), cfg, result,
                  read_json(run_dir / "train_plan.json"))
