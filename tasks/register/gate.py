"""The promotion gate: each criterion on the conservative end of its interval, and a decision that fails closed.

Criteria (thresholds are `register.*` fields):

- `task_gain`: (tuned - baseline) primary metric vs `min_gain` (higher is better);
- `forgetting_ppl`: relative rise of general-text perplexity vs `max_forgetting` (lower is better);
- `forgetting_kl_general`: KL(base || tuned) on general prompts vs `max_kl_general`;
- `forgetting_kl_task`: KL(base || tuned) on the task's own prompts vs `max_kl_task`;
- `forgetting_flips`: accuracy drop on general questions (base - tuned) vs `max_general_accuracy_drop`;
- `memorization`: extraction excess on trained rows beyond held-out rows vs `max_memorization` (or not applicable /
  off, with the evaluation's reason);
- `beat_baselines` (labelled data): tuned - the best fair baseline (zero-shot, k-shot, TF-IDF + logistic regression)
  on the same rows vs `baseline_margin` (not applicable to generation; error when the baselines were not measured);
- `champion`: challenger - champion on the same rows vs `champion_margin` (not applicable without a champion).

Each criterion has a status:

- `pass`: the whole interval is on the good side (higher is better: low > t; lower is better: high <= t);
- `fail`: the whole interval is on the bad side (higher: high <= t; lower: low > t);
- `insufficient`: the interval straddles the threshold; `rows_needed` is about how many rows would decide it (the
  interval's half on the threshold's side shrinking as 1/sqrt(n));
- `not_applicable` / `off`: nothing to check (no champion yet; label-only answers; a check turned off);
- `error`: could not be measured (missing, NaN, listed in `forgetting.not_measured`, a registry error).

Promoted only when every criterion is pass, not_applicable or off. Nothing unmeasured ever passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.config import FewtuneConfig

PASSING = ("pass", "not_applicable", "off")
STATUS_LABELS = {"pass": "pass", "fail": "FAIL", "insufficient": "insufficient", "not_applicable": "n/a", "off": "off",
                 "error": "ERROR"}
HIGHER, LOWER = "higher_is_better", "lower_is_better"

# forgetting criterion -> (signal in evaluation["forgetting"]["signals"], RegisterConfig field, what its rows are)
FORGETTING = {
    "forgetting_ppl": ("general_ppl", "max_forgetting", "general-prose rows"),
    "forgetting_kl_general": ("kl_general", "max_kl_general", "general prompts"),
    "forgetting_kl_task": ("kl_task", "max_kl_task", "test prompts"),
    "forgetting_flips": ("general_flips", "max_general_accuracy_drop", "general questions"),
}


@dataclass
class Criterion:
    name: str
    status: str  # pass | fail | insufficient | not_applicable | off | error
    value: float | None = None  # the point estimate compared with the threshold
    low: float | None = None  # its interval
    high: float | None = None
    threshold: float | None = None
    direction: str = LOWER  # higher_is_better | lower_is_better
    detail: str = ""  # one line: the figures, the interval and what it must clear (or why it was not measured)
    rows_needed: int | None = None  # insufficient: about how many rows would decide it
    rows: str = "test rows"  # what rows_needed counts

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class GateDecision:
    promoted: bool
    decision: str
    criteria: list[Criterion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "decision": self.decision, "criteria": [c.to_dict() for c in self.criteria]}


def _bad(x: Any) -> bool:
    return not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x)


def rows_needed(n: int | None, value: float, low: float, high: float, threshold: float) -> int | None:
    """About how many rows make the interval stop straddling `threshold`: its half on the threshold's side shrinks as
    1/sqrt(n) until it no longer reaches the threshold, ceil(n * (half / |value - threshold|)^2); None if value == t."""
    if not n or value == threshold:
        return None
    half = value - low if value > threshold else high - value
    return max(int(n) + 1, math.ceil(round(n * (half / abs(value - threshold)) ** 2, 6)))  # round: 144.00000000003 is 144


def judge(name: str, value: Any, low: Any, high: Any, threshold: float, direction: str, n: int | None,
          what: str, rows: str = "test rows", conf: str = "interval") -> Criterion:
    """A measured criterion: its status from the interval's conservative end; `what` describes the figures."""
    if _bad(value) or _bad(low) or _bad(high):
        return Criterion(name, "error", None, None, None, threshold, direction, f"could not be computed (NaN): {what}", None, rows)
    v, lo, hi = float(value), float(low), float(high)
    if direction == HIGHER:
        status = "pass" if lo > threshold else "fail" if hi <= threshold else "insufficient"
        rule = f"the lower end must exceed {threshold:+.4g}"
    else:
        status = "pass" if hi <= threshold else "fail" if lo > threshold else "insufficient"
        rule = f"the upper end must be at most {threshold:+.4g}"
    need = rows_needed(n, v, lo, hi, threshold) if status == "insufficient" else None
    detail = f"{what}; {conf} {lo:+.4g} to {hi:+.4g}, {rule}"
    if status == "insufficient":
        detail += f": it straddles {threshold:+.4g}" + (f", about {need} {rows} would decide it" if need else "")
    return Criterion(name, status, v, lo, hi, threshold, direction, detail, need, rows)


def _task_gain(evaluation: dict[str, Any], cfg: FewtuneConfig, conf: str) -> Criterion:
    t = cfg.register_.min_gain
    primary = evaluation.get("primary_metric")
    iv = (evaluation.get("intervals") or {}).get(primary)
    if not iv:
        return Criterion("task_gain", "error", threshold=t, direction=HIGHER, detail=f"no interval for the primary metric {primary!r}")
    if any(_bad(iv.get(k)) for k in ("delta", "low", "high")):
        return judge("task_gain", None, None, None, t, HIGHER, None, f"{primary} gain or its interval")
    flip = iv.get("higher_is_better", True) is False  # a lower-is-better primary metric: the gain is its fall
    delta, low, high = (-iv["delta"], -iv["high"], -iv["low"]) if flip else (iv["delta"], iv["low"], iv["high"])
    what = f"{primary} {iv.get('baseline', float('nan')):.4f} -> {iv.get('tuned', float('nan')):.4f}, gain {delta:+.4f}"
    return judge("task_gain", delta, low, high, t, HIGHER, iv.get("n"), what, conf=conf)


def _signal_text(signal: str, s: dict[str, Any]) -> str:
    v = s.get("value")
    if signal == "general_ppl":
        return f"general-text perplexity {s.get('baseline', float('nan')):.3f} -> {s.get('tuned', float('nan')):.3f}, {v:+.1%}"
    if signal == "general_flips":
        return (f"general questions right {s.get('baseline_accuracy', float('nan')):.3f} -> {s.get('tuned_accuracy', float('nan')):.3f} "
                f"({s.get('right_to_wrong', '?')} right->wrong, {s.get('wrong_to_right', '?')} wrong->right), drop {v:+.3f}")
    where = "general prompts" if signal == "kl_general" else "the task's test prompts"
    return f"KL(base || tuned) on {where} {v:.4f} nats/token"


def _forgetting(evaluation: dict[str, Any], cfg: FewtuneConfig, conf: str) -> list[Criterion]:
    fg = evaluation.get("forgetting")
    out = []
    for name, (signal, knob, rows) in FORGETTING.items():
        t = getattr(cfg.register_, knob)
        if t is None:
            out.append(Criterion(name, "off", direction=LOWER, detail=f"not checked: register.{knob} is null", rows=rows))
            continue
        if not isinstance(fg, dict) or not isinstance(fg.get("signals"), dict):
            out.append(Criterion(name, "error", threshold=t, detail="not measured: the evaluation has no forgetting signals", rows=rows))
            continue
        why_na = (fg.get("not_applicable") or {}).get(signal)
        if why_na:
            out.append(Criterion(name, "not_applicable", threshold=t, detail=why_na, rows=rows))
            continue
        reason = (fg.get("not_measured") or {}).get(signal)
        s = fg["signals"].get(signal)
        if reason or not isinstance(s, dict):
            out.append(Criterion(name, "error", threshold=t, detail=f"not measured: {reason or f'no {signal} signal in the evaluation'}", rows=rows))
            continue
        what = _signal_text(signal, s) if not _bad(s.get("value")) else signal
        out.append(judge(name, s.get("value"), s.get("low"), s.get("high"), t, LOWER, s.get("n"), what, rows, conf))
    return out


def _memorization(evaluation: dict[str, Any], cfg: FewtuneConfig, conf: str) -> Criterion:
    r = cfg.register_
    t, measure = r.max_memorization, r.memorization_measure
    mem = evaluation.get("memorization")
    if not isinstance(mem, dict):
        return Criterion("memorization", "error", threshold=t, detail="not measured: the evaluation has no memorization result",
                         rows="training rows")
    status = mem.get("status") or ("measured" if mem.get(f"excess_{measure}") else None)
    if status in ("not_applicable", "off"):
        return Criterion("memorization", status, threshold=t, detail=mem.get("reason") or status.replace("_", " "), rows="training rows")
    excess = mem.get(f"excess_{measure}")
    if status != "measured" or not isinstance(excess, dict):
        why = mem.get("reason") or "; ".join(mem.get("skipped_reasons") or []) or f"no {measure} excess in the evaluation"
        return Criterion("memorization", "error", threshold=t, detail=f"not measured: {why}", rows="training rows")
    rows = mem.get("rows") or {}
    n = excess.get("n") or (min(v for v in rows.values() if isinstance(v, int)) if any(isinstance(v, int) for v in rows.values()) else None)
    kind = measure.replace("_", "-")
    what = f"{kind} extraction excess on trained rows beyond held-out rows"
    if mem.get("context") == "drop_system":
        what += " (asked without the system message that carries the grounding text)"
    if mem.get("control"):
        what += f" (control: {mem['control']})"
    if not _bad(excess.get("value")):
        what += f" {excess['value']:+.3f}"
    return judge("memorization", excess.get("value"), excess.get("low"), excess.get("high"), t, LOWER, n, what, "training rows", conf)


def _beat_baselines(evaluation: dict[str, Any], cfg: FewtuneConfig, conf: str) -> Criterion:
    t = cfg.register_.baseline_margin
    if not cfg.register_.beat_baselines:
        return Criterion("beat_baselines", "off", threshold=t, direction=HIGHER,
                         detail="not checked: register.beat_baselines is false")
    if evaluation.get("task") != "classification":
        return Criterion("beat_baselines", "not_applicable", threshold=t, direction=HIGHER,
                         detail="generation task: the baselines are the base model (task_gain)")
    table = evaluation.get("baselines") or {}
    systems = {n: b.get("tuned_minus") for n, b in (table.get("systems") or {}).items()}
    missing = table.get("not_measured") or {}
    if missing or not systems or not all(isinstance(d, dict) for d in systems.values()):
        why = "; ".join(f"{n}: {r}" for n, r in missing.items()) or ("the evaluation has no baselines (evaluate.baselines "
                                                                     "is empty, or no training rows to draw them from)")
        return Criterion("beat_baselines", "error", threshold=t, direction=HIGHER,
                         detail=f"not measured: {why}; set register.beat_baselines: false to skip on purpose")
    # Every baseline must be beaten: the one whose interval of (tuned - it) reaches lowest decides.
    name, d = min(systems.items(), key=lambda kv: kv[1].get("low", float("nan")) if not _bad(kv[1].get("low")) else -1e9)
    best = table.get("best")
    what = (f"{d.get('metric')} tuned {d.get('tuned', float('nan')):.4f} vs baseline {name} "
            f"{d.get('baseline', float('nan')):.4f}{' (the best baseline)' if name == best else ''}, delta "
            f"{d.get('delta', float('nan')):+.4f}; every baseline must be beaten: this one's interval reaches lowest")
    return judge("beat_baselines", d.get("delta"), d.get("low"), d.get("high"), t, HIGHER, d.get("n"), what, conf=conf)


def _champion(champion: dict[str, Any] | None, cfg: FewtuneConfig, primary: str, conf: str) -> Criterion:
    t = cfg.register_.champion_margin
    if champion is None:
        return Criterion("champion", "not_applicable", threshold=t, direction=HIGHER, detail="no champion yet")
    if champion.get("off"):
        return Criterion("champion", "off", threshold=t, direction=HIGHER, detail=str(champion["off"]))
    if champion.get("error"):
        return Criterion("champion", "error", threshold=t, direction=HIGHER, detail=str(champion["error"]))
    what = (f"{primary} {champion['challenger']:.4f} vs champion version {champion['version']} {champion['champion']:.4f} "
            f"on the same {champion['n']} rows ({champion['how']}), delta {champion['delta']:+.4f}")
    return judge("champion", champion["delta"], champion["low"], champion["high"], t, HIGHER, champion.get("n"), what, conf=conf)


def _verdict(criteria: list[Criterion]) -> str:
    if all(c.passed for c in criteria):
        skipped = [f"{c.name} {STATUS_LABELS[c.status]}" for c in criteria if c.status != "pass"]
        return f"promoted: {sum(c.status == 'pass' for c in criteria)} of {len(criteria)} criteria pass" + (
            f" ({', '.join(skipped)})" if skipped else "")
    parts = []
    if failed := [c.name for c in criteria if c.status == "fail"]:
        parts.append(f"failed {', '.join(failed)}")
    if unsure := [c for c in criteria if c.status == "insufficient"]:
        parts.append("insufficient evidence on " + ", ".join(
            c.name + (f" (about {c.rows_needed} {c.rows} would decide it)" if c.rows_needed else "") for c in unsure))
    if broken := [c for c in criteria if c.status == "error"]:
        parts.append("could not measure " + ", ".join(f"{c.name} ({c.detail})" for c in broken))
    return "not promoted: " + "; ".join(parts)


def gate_decision(evaluation: dict[str, Any], cfg: FewtuneConfig, champion: dict[str, Any] | None) -> GateDecision:
    """Every criterion of the promotion gate with its status; promoted only if each is pass, not_applicable or off.

    `champion`: None (no champion: not applicable), {"off": reason} (no registry), {"error": message} (the comparison
    failed: not promoted), or the comparison from `compare_with_champion`.
    """
    conf = f"{(evaluation.get('bootstrap') or {}).get('confidence', 0.95) * 100:.0f}% CI"
    primary = evaluation.get("primary_metric", "?")
    criteria = [
        _task_gain(evaluation, cfg, conf),
        *_forgetting(evaluation, cfg, conf),
        _memorization(evaluation, cfg, conf),
        _beat_baselines(evaluation, cfg, conf),
        _champion(champion, cfg, primary, conf),
    ]
    promoted = all(c.passed for c in criteria)
    iv = (evaluation.get("intervals") or {}).get(primary)
    head = ""
    if iv and not any(_bad(iv.get(k)) for k in ("baseline", "tuned", "delta", "low", "high")):
        head = (f". tuned {primary} {iv['tuned']:.4f} vs baseline {iv['baseline']:.4f} ({iv['delta']:+.4f}, {conf} "
                f"{iv['low']:+.4f} to {iv['high']:+.4f})")
    return GateDecision(promoted, _verdict(criteria) + head, criteria)
