"""Trainer callbacks of the train stage: early stopping with the over-memorization guard, the step timer, the live
health warnings; and why training stopped."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from tasks.common.health_checks import (
    Check,
    check_convergence,
    check_loss_gap,
    check_trainable_tokens,
    knob_values,
)
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.train")
health_log = logging.getLogger("fewtune.health")


def rising_streak(values: list[float]) -> int:
    """How many of the last values each rose above the one before (0 when the last one did not rise)."""
    streak = 0
    for prev, cur in zip(values[-2::-1], values[::-1]):
        if cur > prev:
            streak += 1
        else:
            break
    return streak


def eval_loss_values(history: list[dict[str, Any]]) -> list[float]:
    return [h["eval_loss"] for h in history if "eval_loss" in h]


def stage_callbacks(cfg: FewtuneConfig):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class OverMemorizationGuard(TrainerCallback):
        """Stops when the validation slice's perplexity, exp(eval_loss), has risen at `patience` evaluations in a row.

        Stateless: it reads the evaluations from the trainer state, so it works unchanged after a resume.
        """

        def __init__(self, patience: int):
            self.patience = patience

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            losses = eval_loss_values(state.log_history)
            if rising_streak(losses) >= self.patience:
                ppl = [round(math.exp(x), 3) for x in losses[-self.patience - 1 :]]
                log.warning(
                    "over-memorization guard: validation perplexity rose %d evaluations in a row (%s); stopping",
                    self.patience,
                    " -> ".join(map(str, ppl)),
                )
                control.should_training_stop = True

    t = cfg.train
    return EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience), OverMemorizationGuard(
        t.overmemorization_patience
    ), step_timer()


def step_timer():
    """A callback that sums the time and the real (non-pad) tokens inside optimizer steps only — no evaluation or
    checkpoint writing. Needs `include_num_input_tokens_seen="non_padding"`; read `.seconds` and `.tokens`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.tokens = 0
            self.steps = 0
            self._t0 = 0.0
            self._tok0 = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._t0
            self.tokens += state.num_input_tokens_seen - self._tok0
            self.steps += 1

    return StepTimer()


def stop_reason(history: list[dict[str, Any]], steps: int, planned_steps: int, guard_patience: int) -> str:
    """completed | over_memorization (validation perplexity kept rising) | early_stopping (it stopped improving)."""
    if steps >= planned_steps:
        return "completed"
    if rising_streak(eval_loss_values(history)) >= guard_patience:
        return "over_memorization"
    return "early_stopping"


def health_callback(cfg: FewtuneConfig, loss_tokens: int | None = None, rows: int | None = None):
    """A Trainer callback: at each evaluation, the training-log checks over the log so far; a warning in the log the
    first time a sign appears (training goes on: early stopping and the over-memorization guard decide when to stop)."""
    from transformers import TrainerCallback

    h, knobs = cfg.health, knob_values(cfg)

    class HealthCallback(TrainerCallback):
        def __init__(self):
            self.warned: set[str] = set()

        def _warn(self, check: Check) -> None:
            if check.status == "flag" and check.name not in self.warned:
                self.warned.add(check.name)
                health_log.warning("training health: %s: %s; fix: %s", check.title, check.observed, check.advice)

        def on_train_begin(self, args, state, control, **kwargs):
            if loss_tokens is not None:
                self._warn(check_trainable_tokens(loss_tokens, rows, h, knobs))

        def on_evaluate(self, args, state, control, **kwargs):
            live = {**knobs, "train.learning_rate": args.learning_rate, "train.epochs": args.num_train_epochs}
            self._warn(check_convergence(state.log_history, h, live))
            self._warn(check_loss_gap(state.log_history, h, live))

    return HealthCallback()
