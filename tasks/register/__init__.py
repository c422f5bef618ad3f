"""Log the run to MLflow and register the tuned model behind a promotion gate.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`. The alias
`champion` moves to it only when every criterion of the gate passes (`gate.py`):

- task gain: the lower end of the bootstrap interval of (tuned − baseline) primary metric exceeds
  `register.min_gain` — the gain is real, not noise of a small test set;
- forgetting: probe perplexity rose by at most `register.max_forgetting` (relative) — general ability kept;
- memorization: the memorization excess (extraction on training rows beyond held-out rows) is at most
  `register.max_memorization`;
- champion: the tuned model beats the current champion on the same test rows by more than
  `register.champion_margin` (recorded row scores when the champion was evaluated on the same rows with the same
  settings, else the champion's registered model answers the test prompts again; `champion.py`).

The decision and each criterion's value are recorded (run tags, version tags, `gate.json`) and shown. The
registered model's tag `champion_history` lists every champion in order, so `fewtune models rollback` can move the
alias back (`ops.py`: `fewtune models list | promote | rollback`).

The logged model is an MLflow pyfunc holding the adapter plus a reference to the base model (`pyfunc.py`; logging a
PEFT model with a local base through `mlflow.transformers` silently re-initialises weights), so
`mlflow.pyfunc.load_model("models:/NAME@champion")` answers prompts with the tuned model. `AdapterModel` is imported
on first use, so importing this package stays cheap.

Default store: SQLite at `$FEWTUNE_HOME/mlflow.db`, artifacts under `$FEWTUNE_HOME/mlartifacts/`; set
`register.tracking_uri` for a team server.
"""

from __future__ import annotations

from typing import Any

from tasks.register.champion import champion_history, compare_with_champion, generation_key, set_champion
from tasks.register.gate import Criterion, GateDecision, gate_decision
from tasks.register.ops import _client as _client  # `fewtune models list` reads the history through it
from tasks.register.ops import list_versions, promote, rollback
from tasks.register.stage import RegisterResult, log_artifacts, register_model, run_metrics


def __getattr__(name: str) -> Any:
    # `AdapterModel` (and models pickled as `tasks.register.AdapterModel`) load mlflow.pyfunc only when asked for.
    if name == "AdapterModel":
        from tasks.register.pyfunc import AdapterModel

        return AdapterModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterModel",
    "Criterion",
    "GateDecision",
    "RegisterResult",
    "champion_history",
    "compare_with_champion",
    "gate_decision",
    "generation_key",
    "list_versions",
    "log_artifacts",
    "promote",
    "register_model",
    "rollback",
    "run_metrics",
    "set_champion",
]
