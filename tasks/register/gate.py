"""The promotion gate: each criterion, its value against its threshold, and the decision.

- task gain: the lower end of the bootstrap interval of (tuned − baseline) primary metric exceeds
  `register.min_gain` — the gain is real, not noise of a small test set;
- forgetting: probe perplexity rose by at most `register.max_forgetting` (relative) — general ability kept;
- memorization: the memorization excess (extraction on training rows beyond held-out rows) is at most
  `register.max_memorization`;
- champion: the tuned model beats the current champion on the same test rows by more than
  `register.champion_margin`.

A criterion that could not be measured is named as such in its detail, never silently passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.config import FewtuneConfig


@dataclass
class Criterion:
    name: str  # task_gain | forgetting | memorization | champion
    passed: bool
    value: float | None  # what was compared with the threshold (None: not measured)
    threshold: float | None
    detail: str


@dataclass
class GateDecision:
    promoted: bool
    decision: str
    criteria: list[Criterion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def gate_decision(evaluation: dict[str, Any], cfg: FewtuneConfig, champion: dict[str, Any] | None) -> GateDecision:
    """Every criterion of the promotion gate, its value and whether it passed; promoted only if all passed."""
    r = cfg.register_
    conf = f"{evaluation.get('bootstrap', {}).get('confidence', 0.95) * 100:.0f}%"
    primary = evaluation["primary_metric"]
    criteria = []

    iv = evaluation["intervals"][primary]
    criteria.append(
        Criterion(
            "task_gain",
            iv["low"] > r.min_gain,
            iv["low"],
            r.min_gain,
            f"{primary} {iv['baseline']:.4f} -> {iv['tuned']:.4f}, delta {iv['delta']:+.4f} ({conf} CI "
            f"{iv['low']:+.4f} to {iv['high']:+.4f}); the lower end must exceed {r.min_gain:+.4f}",
        )
    )

    fg = evaluation.get("forgetting")
    if fg:
        rel = fg["relative_increase"]
        extra = ""
        if fg.get("metric"):
            m = fg["metric"]
            extra = f"; {m['metric']} {m['baseline']:.4f} -> {m['tuned']:.4f} ({m['delta']:+.4f})"  # probe_<metric>
        criteria.append(
            Criterion(
                "forgetting",
                rel["value"] <= r.max_forgetting,
                rel["value"],
                r.max_forgetting,
                f"probe perplexity {fg['baseline_ppl']:.3f} -> {fg['tuned_ppl']:.3f}, {_pct(rel['value'])} ({conf} CI "
                f"{_pct(rel['low'])} to {_pct(rel['high'])}); at most {_pct(r.max_forgetting)} allowed{extra}",
            )
        )
    else:
        criteria.append(Criterion("forgetting", True, None, r.max_forgetting, "not measured: no probe set (data.probe)"))

    mem = evaluation.get("memorization") or {}
    excess = mem.get(f"excess_{r.memorization_measure}")
    if excess:
        t, b = mem["tuned"], mem["baseline"]
        kind = r.memorization_measure.replace("_", "-")
        criteria.append(
            Criterion(
                "memorization",
                excess["value"] <= r.max_memorization,
                excess["value"],
                r.max_memorization,
                f"{kind} extraction on training rows {b['train'][r.memorization_measure]:.2f} -> "
                f"{t['train'][r.memorization_measure]:.2f}, on held-out rows {b['control'][r.memorization_measure]:.2f} "
                f"-> {t['control'][r.memorization_measure]:.2f}; excess {excess['value']:+.3f} ({conf} CI "
                f"{excess['low']:+.3f} to {excess['high']:+.3f}); at most {r.max_memorization:+.3f} allowed",
            )
        )
    else:
        why = "; ".join(mem.get("skipped_reasons") or []) or "no training rows given"
        criteria.append(Criterion("memorization", True, None, r.max_memorization, f"not measured: {why}"))

    if champion is None:
        criteria.append(Criterion("champion", True, None, r.champion_margin, "no champion yet"))
    else:
        criteria.append(
            Criterion(
                "champion",
                champion["delta"] > r.champion_margin,
                champion["delta"],
                r.champion_margin,
                f"{primary} {champion['challenger']:.4f} vs champion version {champion['version']} "
                f"{champion['champion']:.4f} on the same {champion['n']} rows ({champion['how']}), delta "
                f"{champion['delta']:+.4f} ({conf} CI {champion['low']:+.4f} to {champion['high']:+.4f}); must exceed "
                f"{r.champion_margin:+.4f}",
            )
        )

    promoted = all(c.passed for c in criteria)
    failed = [c.name for c in criteria if not c.passed]
    head = f"tuned {primary} {iv['tuned']:.4f} vs baseline {iv['baseline']:.4f} ({iv['delta']:+.4f}, {conf} CI {iv['low']:+.4f} to {iv['high']:+.4f})"
    decision = (
        f"promoted: all {len(criteria)} criteria passed; {head}"
        if promoted
        else f"kept as challenger: failed {', '.join(failed)}; {head}"
    )
    return GateDecision(promoted, decision, criteria)
