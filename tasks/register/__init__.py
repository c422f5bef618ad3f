"""Log the run to MLflow and register the tuned model behind a promotion gate.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`. The alias
`champion` moves to it only when every criterion of the gate is pass, not applicable or off (`gate.py`); each is read
on the conservative end of its interval:

- task_gain: the (tuned - baseline) primary metric's interval must lie above `register.min_gain`;
- forgetting_ppl, forgetting_kl_general, forgetting_kl_task, forgetting_flips: the general-text perplexity rise, the
  KL(base || tuned) on general and on task prompts, and the accuracy drop on general questions, each interval at or
  below its `register.max_*` threshold;
- memorization: the extraction excess on trained rows beyond held-out rows at or below `register.max_memorization`
  (not applicable for label-only answers);
- champion: the tuned model beats the current champion on the same test rows by more than `register.champion_margin`
  (`champion.py`; a registry error is an error, never "no champion").

An interval that straddles its threshold is "insufficient evidence" (not promoted) with about how many rows would
decide it; a criterion that could not be measured is an error (not promoted). The decision and each criterion's
status, value, interval and threshold are recorded (run tags, version tags `gate.<criterion>`, `gate.json`) and shown.
The registered model's tag `champion_history` lists every champion in order, so `fewtune models rollback` can move the
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

from tasks.register.champion import champion_history, compare_with_champion, current_champion, generation_key, set_champion
from tasks.register.gate import PASSING, STATUS_LABELS, Criterion, GateDecision, gate_decision, rows_needed
from tasks.register.ops import _client as _client  # `fewtune models list` reads the history through it
from tasks.register.ops import list_versions, promote, rollback
from tasks.register.stage import RegisterResult, decision_key, log_artifacts, register_model, run_metrics


def __getattr__(name: str) -> Any:
    # `AdapterModel` (and models pickled as `tasks.register.AdapterModel`) load mlflow.pyfunc only when asked for.
    if name == "AdapterModel":
        from tasks.register.pyfunc import AdapterModel

        return AdapterModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterModel",
    "Criterion",
    "PASSING",
    "STATUS_LABELS",
    "GateDecision",
    "RegisterResult",
    "champion_history",
    "compare_with_champion",
    "current_champion",
    "decision_key",
    "gate_decision",
    "generation_key",
    "list_versions",
    "log_artifacts",
    "promote",
    "register_model",
    "rollback",
    "rows_needed",
    "run_metrics",
    "set_champion",
]
