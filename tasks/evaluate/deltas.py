"""Scored rows and the tuned-minus-baseline rows of the results: values, deltas and their paired intervals."""

from __future__ import annotations

from typing import Any

from tasks.common.measure import LOWER_IS_BETTER, Scored, paired_delta
from tasks.config import FewtuneConfig


def delta_row(name: str, baseline: Scored, tuned: Scored, cfg: FewtuneConfig) -> dict[str, Any]:
    """One metric of the results: both values, tuned − baseline and its paired bootstrap interval."""
    d = paired_delta(baseline, tuned, cfg)
    return {
        "metric": name,
        "n": len(baseline.items),
        "baseline": round(baseline.value, 4),
        "tuned": round(tuned.value, 4),
        "delta": round(d.value, 4),
        "low": round(d.low, 4),
        "high": round(d.high, 4),
        "higher_is_better": name not in LOWER_IS_BETTER,
    }


def scores_dict(scored: dict[str, Scored]) -> dict[str, float]:
    return {k: round(float(s.value), 4) for k, s in scored.items()}


def subset(scored: Scored, index: list[int]) -> Scored:
    """The metric re-measured on some of the rows."""
    items = [scored.items[i] for i in index]
    return Scored(scored.aggregate(items), items, scored.aggregate)


def overmemorization_signal(eval_ppl: dict[str, Scored], over: dict[str, Any], cfg: FewtuneConfig) -> dict[str, Any]:
    """Test perplexity of the reference answers, tuned vs base: a rise flags memorized rows, not a learned task."""
    ratio = paired_delta(eval_ppl["baseline"], eval_ppl["tuned"], cfg, relative=True)
    rose = over["low"] > 0
    return {
        "baseline_eval_ppl": over["baseline"],
        "tuned_eval_ppl": over["tuned"],
        "relative_change": ratio.to_dict(),
        "flag": rose,
        "note": (
            "test perplexity of the reference answers rose after fine-tuning (interval above 0): the model may have "
            "memorized its training rows instead of learning the task, even where task metrics look fine"
            if rose
            else "test perplexity of the reference answers did not rise: no sign of over-memorization"
        ),
    }
