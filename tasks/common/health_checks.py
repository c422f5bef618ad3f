"""The health checks of a training run: plain functions over the train stage's log, its result and plan, and the
evaluation results. Shared by the train stage (live warnings during training) and the health and report stages.

Five checks, thresholds in the `health` config section (what each one means: `tasks/health/__init__.py` and
docs/health.md): eval_perplexity, loss_gap, convergence, baseline, trainable_tokens. `assess` runs them all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tasks.config import FewtuneConfig, HealthConfig

Status = Literal["ok", "flag", "skipped"]

TITLES = {
    "eval_perplexity": "Test-answer perplexity",
    "loss_gap": "Train/validation loss gap",
    "convergence": "Loss convergence",
    "baseline": "Task metric vs baseline",
    "trainable_tokens": "Trainable tokens",
}


@dataclass
class Check:
    """One health check: what was measured, against what threshold, and for a flag what to change."""

    name: str
    status: Status
    observed: str
    threshold: str
    advice: str = ""
    knobs: list[str] = field(default_factory=list)
    value: float | None = None

    @property
    def title(self) -> str:
        return TITLES.get(self.name, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "title": self.title}


@dataclass
class HealthReport:
    checks: list[Check]

    @property
    def flags(self) -> list[Check]:
        return [c for c in self.checks if c.status == "flag"]

    @property
    def healthy(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "flags": [c.name for c in self.flags],
            "checks": [c.to_dict() for c in self.checks],
        }


# ----------------------------------------------------------------------------------------------------------------
# The training curves


def training_losses(train_log: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, training loss) of every logged training-loss entry (the Trainer averages over the logging interval)."""
    return [(int(e["step"]), float(e["loss"])) for e in train_log if "loss" in e and "step" in e]


def eval_losses(train_log: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation; a repeated evaluation of the same step counts once."""
    seen: dict[int, float] = {}
    for e in train_log:
        if "eval_loss" in e and "step" in e:
            seen.setdefault(int(e["step"]), float(e["eval_loss"]))
    return sorted(seen.items())


def loss_gaps(train_log: list[dict[str, Any]]) -> list[dict[str, float]]:
    """At each evaluation: validation loss, the training loss over the interval since the previous evaluation (the
    mean of the losses logged in it; the latest one before it when none was), and their difference (the gap)."""
    train = training_losses(train_log)
    rows: list[dict[str, float]] = []
    previous = -1
    for step, val in eval_losses(train_log):
        inside = [loss for s, loss in train if previous < s <= step]
        before = [loss for s, loss in train if s <= step]
        previous = step
        if not inside and not before:
            continue
        tr = sum(inside) / len(inside) if inside else before[-1]
        rows.append({"step": step, "eval_loss": val, "train_loss": tr, "gap": val - tr})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Checks over the training log


def _knob(knobs: dict[str, Any], name: str) -> str:
    value = knobs.get(name)
    return f"{name} (now {value:g})" if isinstance(value, (int, float)) and not isinstance(value, bool) else name


def check_convergence(train_log: list[dict[str, Any]], h: HealthConfig, knobs: dict[str, Any] | None = None) -> Check:
    """Oscillation or divergence of the training loss: a rebound above its running minimum, an end well above the
    start, or a NaN/inf loss."""
    knobs = knobs or {}
    threshold = f"rebound ≤ {h.max_loss_rebound:.0%} of the first loss; ends ≤ {h.max_loss_rise:.0%} above it"
    losses = [loss for _, loss in training_losses(train_log)]
    if len(losses) < 3:
        return Check("convergence", "skipped", f"{len(losses)} logged training losses (at least 3 needed)", threshold)
    advice = (
        f"lower {_knob(knobs, 'train.learning_rate')}, e.g. to a tenth (or `auto`), give it a longer "
        f"{_knob(knobs, 'train.warmup_ratio')}, and keep {_knob(knobs, 'train.max_grad_norm')} at 1.0 or below"
    )
    knob_names = ["train.learning_rate", "train.warmup_ratio", "train.max_grad_norm"]
    if any(not math.isfinite(x) for x in losses):
        return Check("convergence", "flag", "the training loss became NaN or infinite: training diverged", threshold,
                     advice, knob_names, math.inf)
    first = losses[0]
    rebound, at, low_before = 0.0, 0, first
    low = first
    for i, loss in enumerate(losses[1:], 1):
        if loss - low > rebound:
            rebound, at, low_before = loss - low, i, low
        low = min(low, loss)
    share = rebound / first if first > 0 else 0.0
    if share > h.max_loss_rebound:
        observed = (
            f"the training loss climbed back from {low_before:.3f} to {losses[at]:.3f} (a rebound of {share:.0%} of "
            f"the first loss, {first:.3f}) instead of converging: oscillating, the learning rate is too high"
        )
        return Check("convergence", "flag", observed, threshold, advice, knob_names, round(share, 4))
    if losses[-1] > first * (1 + h.max_loss_rise):
        observed = (
            f"the training loss ended at {losses[-1]:.3f}, {losses[-1] / first - 1:.0%} above where it started "
            f"({first:.3f}): training diverged"
        )
        return Check("convergence", "flag", observed, threshold, advice, knob_names, round(share, 4))
    observed = f"{first:.3f} → {losses[-1]:.3f} over {len(losses)} logged losses; largest rebound {share:.0%} of the first"
    return Check("convergence", "ok", observed, threshold, value=round(share, 4))


def check_loss_gap(
    train_log: list[dict[str, Any]], h: HealthConfig, knobs: dict[str, Any] | None = None, stop_reason: str | None = None
) -> Check:
    """Over-fitting: the validation-minus-training loss gap ends large and grew since the best validation loss (or
    over the last `gap_window` evaluations)."""
    knobs = knobs or {}
    threshold = f"gap ≤ {h.max_loss_gap:g} nats, or not growing"
    rows = loss_gaps(train_log)
    if len(rows) < 2:
        return Check("loss_gap", "skipped", f"{len(rows)} evaluation(s) with a training loss (at least 2 needed)", threshold)
    gaps = [r["gap"] for r in rows]
    best = min(range(len(rows)), key=lambda i: rows[i]["eval_loss"])
    ref = min(best, max(0, len(rows) - 1 - h.gap_window))
    final, growth = gaps[-1], gaps[-1] - gaps[ref]
    last = rows[-1]
    if final > h.max_loss_gap and growth > 0:
        since = (
            f"since the best validation loss at step {rows[best]['step']}" if ref == best
            else f"over the last {len(rows) - 1 - ref} evaluations"
        )
        observed = (
            f"validation loss {last['eval_loss']:.3f} vs training loss {last['train_loss']:.3f} at step {last['step']}: "
            f"a gap of {final:.2f} nats (validation perplexity {math.exp(final):.1f}x the training one), "
            f"{growth:+.2f} {since}: over-fitting"
        )
        advice = (
            f"fewer passes: lower {_knob(knobs, 'train.epochs')}; more regularisation: raise "
            f"{_knob(knobs, 'train.lora_dropout')} towards 0.2, or {_knob(knobs, 'train.weight_decay')}; fewer "
            f"trainable weights: lower {_knob(knobs, 'train.lora_r')} or set train.lora_top_layers; more data: add "
            "rows or set augment.enabled=true"
        )
        if stop_reason in ("early_stopping", "over_memorization"):
            advice += f" (training stopped early: {stop_reason}; the adapter is the best checkpoint, before the gap grew)"
        knob_names = ["train.epochs", "train.lora_dropout", "train.weight_decay", "train.lora_r", "augment.enabled"]
        return Check("loss_gap", "flag", observed, threshold, advice, knob_names, round(final, 4))
    observed = f"gap {final:+.2f} nats at step {last['step']} ({growth:+.2f} since step {rows[ref]['step']})"
    return Check("loss_gap", "ok", observed, threshold, value=round(final, 4))


def check_trainable_tokens(loss_tokens: int | None, rows: int | None, h: HealthConfig, knobs: dict[str, Any] | None = None) -> Check:
    knobs = knobs or {}
    threshold = f"≥ {h.min_trainable_tokens:,} per epoch"
    if loss_tokens is None:
        return Check("trainable_tokens", "skipped", "not recorded by this run's training (`fewtune health RUN_DIR` counts them)", threshold)
    per_row = f" (~{loss_tokens / rows:.0f} per row over {rows} rows)" if rows else ""
    if loss_tokens < h.min_trainable_tokens:
        observed = (
            f"{loss_tokens:,} answer tokens carry training loss per epoch{per_row}: too little signal, results will "
            "swing with the seed and the split"
        )
        advice = (
            "add rows, or set augment.enabled=true (paraphrases and self-distilled answers add rows); raise "
            f"{_knob(knobs, 'model.max_length')} if answers get cut; masked tokens carry no loss "
            "(score.token_masking); cv.folds=5 shows how much the result depends on the split"
        )
        knob_names = ["augment.enabled", "model.max_length", "score.token_masking.enabled", "cv.folds"]
        return Check("trainable_tokens", "flag", observed, threshold, advice, knob_names, float(loss_tokens))
    return Check("trainable_tokens", "ok", f"{loss_tokens:,} answer tokens carry loss per epoch{per_row}", threshold,
                 value=float(loss_tokens))


# ----------------------------------------------------------------------------------------------------------------
# Checks over the evaluation


def check_eval_perplexity(evaluation: dict[str, Any] | None, h: HealthConfig, knobs: dict[str, Any] | None = None) -> Check:
    knobs = knobs or {}
    threshold = f"≤ {h.max_eval_ppl:g}"
    ppl = ((evaluation or {}).get("tuned") or {}).get("eval_ppl")
    if evaluation is None or ppl is None:
        return Check("eval_perplexity", "skipped", "no evaluation results", threshold)
    base = (evaluation.get("baseline") or {}).get("eval_ppl")
    was = f" (base model: {base:.2f})" if base is not None else ""
    if ppl > h.max_eval_ppl:
        observed = f"the tuned model's perplexity of the test answers is {ppl:.2f}{was}: it has not learned the domain's answers"
        advice = (
            f"train more: raise {_knob(knobs, 'train.epochs')} or {_knob(knobs, 'train.learning_rate')}; check that the "
            "test answers look like the training answers (score_report.md lists outlier rows); a larger model.base "
            "helps on hard tasks; if the test set is meant to be out of domain, raise health.max_eval_ppl"
        )
        knob_names = ["train.epochs", "train.learning_rate", "model.base", "health.max_eval_ppl"]
        return Check("eval_perplexity", "flag", observed, threshold, advice, knob_names, round(ppl, 4))
    return Check("eval_perplexity", "ok", f"{ppl:.2f}{was}", threshold, value=round(ppl, 4))


def check_baseline(evaluation: dict[str, Any] | None, h: HealthConfig, knobs: dict[str, Any] | None = None) -> Check:
    knobs = knobs or {}
    threshold = f"tuned ≥ baseline - {h.metric_margin:g}"
    if not evaluation or not evaluation.get("primary_metric"):
        return Check("baseline", "skipped", "no evaluation results", threshold)
    metric = evaluation["primary_metric"]
    base, tuned = evaluation["baseline"].get(metric), evaluation["tuned"].get(metric)
    if base is None or tuned is None:
        return Check("baseline", "skipped", f"{metric} missing from the evaluation results", threshold)
    iv = (evaluation.get("intervals") or {}).get(metric) or {}
    interval = f", interval {iv['low']:+.4f} to {iv['high']:+.4f}" if "low" in iv else ""
    delta = tuned - base
    if delta < -h.metric_margin:
        observed = f"{metric} {tuned:.4f} tuned vs {base:.4f} for the base model ({delta:+.4f}{interval}): fine-tuning made the task worse"
        advice = (
            "check that the training answers are right and consistent (`fewtune validate DATA`, score_report.md); "
            f"lower {_knob(knobs, 'train.learning_rate')} or {_knob(knobs, 'train.epochs')}; the base model may already "
            "be good enough for this task (the gate does not promote this version)"
        )
        knob_names = ["data.train", "train.learning_rate", "train.epochs"]
        return Check("baseline", "flag", observed, threshold, advice, knob_names, round(delta, 4))
    return Check("baseline", "ok", f"{metric} {base:.4f} → {tuned:.4f} ({delta:+.4f}{interval})", threshold, value=round(delta, 4))


# ----------------------------------------------------------------------------------------------------------------
# All checks


def knob_values(cfg: FewtuneConfig, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values advice quotes: what training used (its plan resolves `auto`), else the config."""
    t, plan = cfg.train, plan or {}
    return {
        "train.learning_rate": plan.get("learning_rate", t.learning_rate),
        "train.epochs": plan.get("epochs", t.epochs),
        "train.warmup_ratio": t.warmup_ratio,
        "train.max_grad_norm": t.max_grad_norm,
        "train.lora_dropout": t.lora_dropout,
        "train.weight_decay": t.weight_decay,
        "train.lora_r": t.lora_r,
        "model.max_length": cfg.model.max_length,
    }


def assess(
    train_log: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    cfg: FewtuneConfig,
    train_result: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
) -> HealthReport:
    """Every health check of a run: training log, train result (trainable tokens) and evaluation results."""
    h, knobs, result = cfg.health, knob_values(cfg, plan), train_result or {}
    return HealthReport(
        [
            check_eval_perplexity(evaluation, h, knobs),
            check_loss_gap(train_log, h, knobs, result.get("stop_reason")),
            check_convergence(train_log, h, knobs),
            check_baseline(evaluation, h, knobs),
            check_trainable_tokens(result.get("loss_tokens"), result.get("train_rows"), h, knobs),
        ]
    )
