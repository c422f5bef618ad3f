"""Plan: which techniques run, from the config and the dataset size; the order rows are worked on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.augment.rows import _answer
from tasks.config import AugmentConfig


@dataclass
class Plan:
    self_distill: str  # off | replace | add
    paraphrase_n: int
    reasons: dict[str, str]
    outlier_ids: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.self_distill != "off" or self.paraphrase_n > 0 or bool(self.outlier_ids)


def plan_augmentation(records: Sequence[dict[str, Any]], cfg: AugmentConfig, outlier_ids: Sequence[str] = ()) -> Plan:
    """Resolve `self_distill: auto` and `paraphrase.n: auto` from the number of training rows, with the reason.

    Rows that the score stage sent here (`score.outlier_action: augment`) are rewritten in replace mode whatever the
    plan says for the other rows, even when augmentation is otherwise off.
    """
    n = len(records)
    outliers = list(outlier_ids)
    if not cfg.enabled:
        return Plan("off", 0, {"self_distill": "augment.enabled=false", "paraphrase": "augment.enabled=false"}, outliers)
    labelled = n > 0 and all(r.get("label") not in (None, "") for r in records)
    if cfg.self_distill not in ("auto", "on"):
        mode, why = cfg.self_distill, "set in the config"
    elif cfg.self_distill == "on":
        below = n < cfg.self_distill_add_below
        mode = "add" if below else "replace"
        why = f"on: {n} rows {'<' if below else '>='} self_distill_add_below={cfg.self_distill_add_below}"
    elif labelled:
        mode, why = "off", "every row has a label: the answers are labels, there is nothing to rewrite"
    elif n < cfg.self_distill_add_below:
        mode, why = "add", (
            f"{n} rows < self_distill_add_below={cfg.self_distill_add_below}: rewrites join the gold rows (a second "
            "phrasing of every answer; training time grows with the rows, which is small at this size)"
        )
    elif n < cfg.self_distill_off_from:
        mode, why = "replace", (
            f"{n} rows < self_distill_off_from={cfg.self_distill_off_from}: rewrites replace the gold rows "
            "(closer to the base model's own distribution, less forgetting, same training time)"
        )
    else:
        mode, why = "off", f"{n} rows >= self_distill_off_from={cfg.self_distill_off_from}: generation would take too long"
    p = cfg.paraphrase
    if p.n != "auto":
        pn, pwhy = int(p.n), "set in the config"
    elif n < p.auto_small_rows:
        pn, pwhy = p.auto_small_n, f"{n} rows < paraphrase.auto_small_rows={p.auto_small_rows}: each prompt phrased few ways"
    elif n < p.auto_off_from:
        pn, pwhy = p.auto_n, f"{n} rows < paraphrase.auto_off_from={p.auto_off_from}"
    else:
        pn, pwhy = 0, f"{n} rows >= paraphrase.auto_off_from={p.auto_off_from}: large sets already vary their phrasing"
    if pn > 1 and p.temperature == 0:
        pn, pwhy = 1, pwhy + "; paraphrase.temperature=0 (greedy) gives one variant at most"
    return Plan(mode, pn, {"self_distill": why, "paraphrase": pwhy}, outliers)


def spread_order(records: Sequence[dict[str, Any]], first_ids: Iterable[str] = ()) -> list[int]:
    """Row positions to work on: `first_ids` rows first, then every distinct answer's first row, then its second...

    When a budget ends generation early, the rows done are spread over as many different answers as possible.
    """
    first = set(first_ids)
    head = [i for i, r in enumerate(records) if r["id"] in first]
    seen: Counter[str] = Counter()
    rank = []
    for i, r in enumerate(records):
        if r["id"] in first:
            continue
        key = _answer(r)
        rank.append((seen[key], i))
        seen[key] += 1
    return head + [i for _, i in sorted(rank)]
