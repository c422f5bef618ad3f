"""Training-curve trackers besides MLflow: TensorBoard and Weights & Biases (`train.report_to`).

Both are optional packages (`pip install 'fewtune[tracking]'`) and never required: with `train.report_to: [none]`
(the default) nothing is imported. A tracker listed in the config whose package is missing stops the run before any
work with a message saying what to install.

- tensorboard: event files under the train stage folder's `tensorboard/` (copied into the run folder);
  `tensorboard --logdir runs/<run-name>/tensorboard` shows loss, validation loss and learning rate per step.
- wandb: the transformers `WandbCallback`. Without `WANDB_API_KEY` (and without an explicit `WANDB_MODE`) it runs in
  offline mode: runs are written under `$FEWTUNE_HOME/wandb/` and `wandb sync` uploads them later. The project is
  `WANDB_PROJECT`, else the config name.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from tasks.common.home import fewtune_home
from tasks.config import ConfigError, FewtuneConfig

log = logging.getLogger("fewtune.tracking")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trackers(cfg: FewtuneConfig) -> list[str]:
    return [name for name in cfg.train.report_to if name != "none"]


def check_trackers(cfg: FewtuneConfig) -> None:
    """A clear error when a tracker in train.report_to is not installed (called before the run starts working)."""
    missing = [name for name in trackers(cfg) if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            f"train.report_to lists {', '.join(missing)}, but the package is not installed\n"
            f"  fix: pip install 'fewtune[tracking]' (or pip install {' '.join(PACKAGES[m] for m in missing)}), "
            "or remove it from train.report_to"
        )


def tracking_callbacks(cfg: FewtuneConfig, out_dir: Path) -> list:
    """Trainer callbacks for the trackers in train.report_to (none: an empty list, nothing imported)."""
    check_trackers(cfg)
    callbacks: list = []
    if "tensorboard" in trackers(cfg):
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        logdir = Path(out_dir) / "tensorboard"
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logdir))))
        log.info("TensorBoard: tensorboard --logdir %s", logdir)
    if "wandb" in trackers(cfg):
        from transformers.integrations import WandbCallback

        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_PROJECT", cfg.name)
        os.environ.setdefault("WANDB_DIR", str(fewtune_home() / "wandb"))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        callbacks.append(WandbCallback())
        log.info("Weights & Biases: project %s, mode %s, folder %s", os.environ["WANDB_PROJECT"],
                 os.environ.get("WANDB_MODE", "online"), os.environ["WANDB_DIR"])
    return callbacks
