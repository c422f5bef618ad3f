"""Evaluation dicts built by hand in the shape `evaluate_models` writes (the parts the promotion gate reads)."""

from __future__ import annotations

from typing import Any

from tasks.config import FewtuneConfig

NAN = float("nan")


def interval(metric: str, baseline: float, delta: float, low: float, high: float, n: int = 100) -> dict[str, Any]:
    return {"metric": metric, "n": n, "baseline": baseline, "tuned": baseline + delta, "delta": delta, "low": low,
            "high": high, "higher_is_better": True}


def signal(value: float, low: float, high: float, n: int = 200, **extra: Any) -> dict[str, Any]:
    return {"value": value, "low": low, "high": high, "n": n, **extra}


def forgetting(ppl=(0.05, 0.02, 0.08), kl_general=(0.03, 0.02, 0.05), kl_task=(0.4, 0.3, 0.5), flips=(0.01, -0.02, 0.04),
               not_measured: dict[str, str] | None = None) -> dict[str, Any]:
    """Forgetting signals (value, low, high); the defaults are well inside the default thresholds."""
    return {
        "probe": {"prose_rows": 200, "question_rows": 120, "extra_rows": 0},
        "signals": {
            "general_ppl": signal(*ppl, baseline=12.0, tuned=12.0 * (1 + ppl[0])),
            "kl_general": signal(*kl_general),
            "kl_task": signal(*kl_task, n=100),
            "general_flips": signal(*flips, n=120, baseline_accuracy=0.6, tuned_accuracy=0.6 - flips[0],
                                    right_to_wrong=4, wrong_to_right=3),
        },
        "not_measured": not_measured or {},
    }


def memorization(excess=(0.02, -0.05, 0.08), status: str = "measured", reason: str = "") -> dict[str, Any]:
    value, low, high = excess
    measured = status == "measured"
    return {
        "status": status,
        "reason": reason,
        "control": "the early-stopping validation slice (held out of training)",
        "excess_near_verbatim": {"value": value, "low": low, "high": high} if measured else None,
        "excess_exact": {"value": 0.0, "low": -0.02, "high": 0.02} if measured else None,
        "rows": {"train": 64, "control": 64} if measured else {},
    }


def evaluation(primary: str = "fact_accuracy", delta=(0.2, 0.1, 0.3), **parts: Any) -> dict[str, Any]:
    """An evaluation whose every criterion passes the default gate unless `parts` says otherwise
    (`forgetting=...`, `memorization=...`, `intervals=...`)."""
    ev = {
        "task": "generation",
        "primary_metric": primary,
        "n_examples": 100,
        "bootstrap": {"confidence": 0.95, "samples": 1000},
        "intervals": {primary: interval(primary, 0.4, *delta)},
        "forgetting": forgetting(),
        "memorization": memorization(),
    }
    ev.update(parts)
    return ev


def config(**register: Any) -> FewtuneConfig:
    """Gate thresholds pinned here (not the shipped defaults), so the hand-made figures below keep their meaning."""
    pinned = {"max_forgetting": 0.2, "max_kl_general": 0.15, "max_kl_task": 1.0, "max_general_accuracy_drop": 0.1,
              "max_memorization": 0.1, "min_gain": 0.0, "champion_margin": 0.0, "beat_baselines": True,
              "baseline_margin": 0.0}
    return FewtuneConfig(data={"train": "-"}, register={**pinned, **register})


def statuses(gate) -> dict[str, str]:
    return {c.name: c.status for c in gate.criteria}
