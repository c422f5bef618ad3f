"""Task metrics as `evaluate.Metric` modules, loaded from this folder by path (the hub is not needed).

Each metric lives in `metrics/<name>/<name>.py`. `evaluate` copies the module into its modules cache
(`$HF_MODULES_CACHE`, by default `$HF_HOME/modules`, i.e. `~/.cache/huggingface/modules`) and imports it from
there; this works offline (`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`).

What the modules share lives in this package, which they import absolutely (`from metrics import _common`; it
is importable wherever fewtune is installed): `_common.py` (the `evaluate` info, input checks, the result layout and
the mean-of-row-scores base), `_text.py` (SQuAD normalization) and `_classification.py` (per-label counts and the
macro, micro and weighted averages).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules in this folder."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a metric of this folder by name, e.g. `load_metric("rouge_l").compute(predictions=..., references=...)`."""
    path = METRICS_DIR / name
    if name.startswith((".", "_")) or not (path / f"{name}.py").is_file():
        raise ValueError(
            f"unknown metric {name!r}; available: {', '.join(available_metrics())} "
            f"(each is a module {METRICS_DIR}/<name>/<name>.py)"
        )
    import evaluate  # imported here: it takes seconds and only the evaluate stage needs it

    # keep_in_memory: results stay in memory instead of temporary Arrow files under the cache folder.
    return evaluate.load(str(path), keep_in_memory=True)
