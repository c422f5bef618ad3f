"""k-fold cross-validation for tiny datasets (`cv.folds` > 1).

With a few hundred rows, one test split gives a score that moves a lot with which rows land in it. Cross-validation
splits the training rows into k folds; for each fold it trains an adapter on the other k-1 folds with the run's
settings (`train_adapter`) and evaluates it against the base model on the held-out fold (`evaluate_models`): the
mean ± spread of the task metric, the gain over the base model and forgetting over the k folds say how much one
number can be trusted. The final adapter is then trained on all rows by the ordinary train stage and evaluated on the
eval set as usual.

Folds never split a row from the rows made from it: augmented rows (`parent_id`) stay with their parent, and only
gold rows are tested (augmented rows are training material, never test rows). Folds are assigned by a seeded hash of
the row ids (`cv.seed`), so the same rows always fall into the same folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.general_probe import load_general_probe
from tasks.common.measure import resolve_primary_metric, task_type
from tasks.common.records import read_jsonl
from tasks.config import ConfigError, FewtuneConfig
from tasks.evaluate import evaluate_models
from tasks.train import train_adapter

log = logging.getLogger("fewtune.cv")


def _group(row: dict[str, Any]) -> str:
    return str(row.get("parent_id") or row["id"])


def make_folds(records: list[dict[str, Any]], k: int, seed: int) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """k (train, test) pairs: each fold's groups (a row and the rows derived from it) are tested once, gold rows only."""
    groups = sorted({_group(r) for r in records}, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    gold_groups = {_group(r) for r in records if r.get("source", "gold") == "gold"}
    if len(gold_groups) < 2 * k:
        raise ConfigError(
            f"cv.folds={k} needs at least {2 * k} gold training rows (two per fold); there are {len(gold_groups)}\n"
            "  fix: lower cv.folds, or set cv.folds=1 to switch cross-validation off"
        )
    fold_of = {g: i % k for i, g in enumerate(g for g in groups if g in gold_groups)}
    folds = []
    for i in range(k):
        test = [r for r in records if fold_of.get(_group(r)) == i and r.get("source", "gold") == "gold"]
        train = [r for r in records if fold_of.get(_group(r)) != i]
        folds.append((train, test))
    return folds


@dataclass
class FoldResult:
    fold: int
    train_rows: int
    test_rows: int
    adapter_path: str
    baseline: float
    tuned: float
    gain: float
    tuned_eval_ppl: float
    forgetting: float | None  # relative rise of general-text perplexity, tuned / base - 1
    stop_reason: str
    steps: int


@dataclass
class CVResult:
    folds: list[FoldResult]
    primary_metric: str
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def summarize(folds: list[FoldResult]) -> dict[str, dict[str, float]]:
    out = {
        "baseline": spread([f.baseline for f in folds]),
        "tuned": spread([f.tuned for f in folds]),
        "gain": spread([f.gain for f in folds]),
        "tuned_eval_ppl": spread([f.tuned_eval_ppl for f in folds]),
    }
    forgetting = [f.forgetting for f in folds if f.forgetting is not None]
    if forgetting:
        out["forgetting"] = spread(forgetting)
    return out


def cross_validate(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    base_path: str,
    out_dir: Path,
    *,
    probe: list[dict[str, Any]] | None = None,
    replay: list[dict[str, Any]] | None = None,
    token_masks: str | None = None,
) -> CVResult:
    """Train and evaluate one adapter per fold under `out_dir/fold-<i>/`; writes `out_dir/cv_results.json`.

    `probe`: the data.probe rows, added to the shipped general-ability probe that forgetting is measured on;
    `replay`: the data.replay rows (None: on-policy replay). Each fold's validation slice is its memorization control.
    """
    k = cfg.cv.folds
    out_dir = Path(out_dir)
    general = load_general_probe(probe)
    # One primary metric for every fold (auto resolved once, on all rows), so the folds' figures are comparable.
    cfg = cfg.model_copy(deep=True)
    cfg.evaluate.primary_metric = resolve_primary_metric(task_type(records, cfg), records, cfg)
    results = []
    for i, (train, test) in enumerate(make_folds(records, k, cfg.cv.seed)):
        log.info("cv fold %d of %d: training on %d rows, testing on %d", i + 1, k, len(train), len(test))
        fold_dir = out_dir / f"fold-{i + 1}"
        trained = train_adapter(train, cfg, base_path, fold_dir / "train", probe=probe, replay=replay, token_masks=token_masks)
        validation = read_jsonl(trained.validation_path) if trained.validation_path else None
        ev = evaluate_models(test, general, cfg, base_path, trained.adapter_path, fold_dir / "evaluate",
                             train_records=train, validation_records=validation)
        metric = ev.primary_metric
        results.append(
            FoldResult(
                fold=i + 1,
                train_rows=len(train),
                test_rows=len(test),
                adapter_path=trained.adapter_path,
                baseline=ev.baseline[metric],
                tuned=ev.tuned[metric],
                gain=ev.gain,
                tuned_eval_ppl=ev.tuned["eval_ppl"],
                forgetting=general_ppl_rise(ev.forgetting),
                stop_reason=trained.stop_reason,
                steps=trained.steps,
            )
        )
    result = CVResult(results, cfg.evaluate.primary_metric, summarize(results))  # resolved once above (e.g. from auto)
    path = out_dir / "cv_results.json"
    result.path = str(path)
    path.write_text(json.dumps(result.to_dict(), indent=2))
    log.info("cv: %s", cv_line(result.to_dict()))
    return result


def general_ppl_rise(forgetting: dict[str, Any] | None) -> float | None:
    """The relative rise of general-text perplexity (tuned / base - 1) of an evaluation's forgetting signals; None
    when it was not measured (or could not be computed: NaN)."""
    value = ((forgetting or {}).get("signals") or {}).get("general_ppl", {}).get("value")
    return float(value) if isinstance(value, (int, float)) and value == value else None


def cv_line(cv: dict[str, Any]) -> str:
    """One line: the primary metric's mean ± spread over the folds, the gain and forgetting."""
    s, metric = cv["summary"], cv["primary_metric"]

    def pm(key: str, pct: bool = False) -> str:
        v = s[key]
        return f"{100 * v['mean']:+.1f}% ± {100 * v['std']:.1f}%" if pct else f"{v['mean']:.4f} ± {v['std']:.4f}"

    line = (
        f"{len(cv['folds'])} folds: {metric} tuned {pm('tuned')} vs base {pm('baseline')}, gain {s['gain']['mean']:+.4f} "
        f"± {s['gain']['std']:.4f} (from {s['gain']['min']:+.4f} to {s['gain']['max']:+.4f})"
    )
    if "forgetting" in s:
        line += f"; general-text perplexity {pm('forgetting', pct=True)}"
    return line
