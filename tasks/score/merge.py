"""Merging shard results (Dask, `run.task_runner: dask`) into the score stage's result: score tables concatenated in
row order, the dataset-wide parts (robust z-score, outlier flag, corpus perplexity) recomputed over all rows, so the
merge equals one task over all rows."""

from __future__ import annotations

from pathlib import Path

from tasks.common.nll import perplexity, robust_z
from tasks.score.stage import ScoreResult


def merge_scores(shard_paths: list[str | Path], outlier_z: float, out_path: str | Path):
    """Concatenate shard score tables; recompute z-scores and outliers over all rows. Returns a `ScoreResult`."""
    import pandas as pd

    frame = pd.concat([pd.read_parquet(p) for p in shard_paths], ignore_index=True)
    frame["log_ppl_z"] = robust_z([float(x) for x in frame["nll_mean"]])
    frame["outlier"] = frame["log_ppl_z"] > outlier_z
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out_path, index=False)
    rows = frame.to_dict("records")
    nlls = [list(r["token_nll"]) for r in rows]
    return ScoreResult(rows, perplexity(nlls), int(frame["outlier"].sum()), out_path)
