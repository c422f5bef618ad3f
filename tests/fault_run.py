"""Run the real fewtune flow in this process and `kill -9` it at a chosen point: the child of tests/test_faults.py.

    python tests/fault_run.py CONFIG POINT

POINT is where the process SIGKILLs itself (nothing is cleaned up, as after a crash or an OOM kill):
- `score`: after the scores parquet is written, half of it cut off, before the stage's result is saved;
- `train`: right after the first training checkpoint is saved;
- `evaluate`: after the predictions are written, before the stage's result is saved;
- `register`: after the model version is created in the registry, before its aliases are set;
- `none`: no kill (a normal run).
The patches wrap the real functions; nothing else changes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    import flows.stages as stages

    if point == "score":
        real = stages.scores_output

        def scores_output(folder, result, cfg, train_path):
            real(folder, result, cfg, train_path)
            parquet = Path(folder) / "scores.parquet"
            parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])  # a write cut short
            _die()

        stages.scores_output = scores_output
    elif point == "train":
        from transformers import Trainer

        real = Trainer._save_checkpoint

        def save_checkpoint(self, *args, **kwargs):
            real(self, *args, **kwargs)
            _die()

        Trainer._save_checkpoint = save_checkpoint
    elif point == "evaluate":
        real = stages.evaluate_models

        def evaluate_models(*args, **kwargs):
            real(*args, **kwargs)
            _die()

        stages.evaluate_models = evaluate_models
    elif point == "register":
        from tasks.register import versions

        def finish(*args, **kwargs):
            _die()

        versions.finish = finish
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    config, point = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    install(point)
    from flows.finetune import finetune

    summary = finetune(config_path=config)
    print("FINISHED", summary["run_dir"])
