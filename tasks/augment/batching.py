"""Budgets and the batched generation loop: the techniques' batches take turns until a budget ends them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from tasks.augment.generators import Generated, Generator


@dataclass
class Budget:
    max_new_rows: int
    max_seconds: float
    start: float = field(default_factory=time.perf_counter)
    kept: int = 0
    stopped: str | None = None
    generation_s: float = 0.0

    def may_start_batch(self, expected_s: float) -> bool:
        """No batch starts once max_new_rows rows are kept, nor when it would end past max_seconds (`expected_s`: the
        duration of the technique's batch before; a technique's first batch always starts within the budget)."""
        if self.kept >= self.max_new_rows:
            self.stopped = self.stopped or "max_new_rows"
            return False
        if time.perf_counter() - self.start + expected_s > self.max_seconds:
            self.stopped = self.stopped or "max_seconds"
            return False
        return True


@dataclass
class TechniqueLog:
    """What one technique did: candidates, outcomes and reasons."""

    name: str
    mode: str
    rows_planned: int = 0
    rows_attempted: int = 0
    generated: int = 0
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    over_budget: int = 0  # passed every filter after max_new_rows was reached
    seconds: float = 0.0
    last_batch_s: float = 0.0

    def counts(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rows_planned": self.rows_planned,
            "rows_attempted": self.rows_attempted,
            "rows_not_attempted": self.rows_planned - self.rows_attempted,
            "generated": self.generated,
            "kept": len(self.kept),
            "rejected": len(self.rejected),
            "over_budget": self.over_budget,
            "rejected_by_rule": dict(Counter(r["rule"] for r in self.rejected).most_common()),
            "kept_by_rule": dict(Counter(r["rule"] for r in self.kept).most_common()),
            "seconds": round(self.seconds, 1),
        }


def _batches(positions: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def _batch_steps(
    desc: str,
    positions: list[int],
    conversation: Callable[[int], list[dict[str, str]]],
    max_tokens: Callable[[int], int],
    generator: Generator,
    budget: Budget,
    *,
    batch_size: int,
    n: int,
    temperature: float,
    seed: int,
    handle: Callable[[list[int], list[list[Generated]]], None],
    log_: TechniqueLog,
    bar_position: int = 0,
) -> Iterator[None]:
    """Generate and judge one batch per step (a generator: the techniques take turns, see `_take_turns`)."""
    with tqdm(total=len(positions), desc=desc, unit="row", leave=False, position=bar_position) as bar:
        for number, batch in enumerate(_batches(positions, batch_size)):
            if not budget.may_start_batch(log_.last_batch_s):
                return
            began = time.perf_counter()
            outs = generator.generate(
                [conversation(i) for i in batch], max(max_tokens(i) for i in batch), n=n, temperature=temperature, seed=seed + number
            )
            log_.last_batch_s = time.perf_counter() - began
            budget.generation_s += log_.last_batch_s
            log_.seconds += log_.last_batch_s
            log_.rows_attempted += len(batch)
            log_.generated += sum(len(o) for o in outs)
            handle(batch, outs)
            bar.update(len(batch))
            yield


def _take_turns(steps: list[Iterator[None]]) -> None:
    """Run the techniques' batches in turn, so a time budget that ends generation leaves every technique some work."""
    while steps:
        for step in list(steps):
            if next(step, StopIteration) is StopIteration:
                steps.remove(step)
