"""Split training rows into shards and merge the per-shard results of score and augment.

With `run.task_runner: dask` the flow scores and augments each shard as its own task on a Dask cluster. Rows are
cut into contiguous shards (order kept), and the merged results equal what one task over all rows produces:
scores are concatenated in row order and the dataset-wide parts (robust z-score, outlier flag, corpus perplexity)
are recomputed over all rows; augmented rows are concatenated in shard order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.records import write_jsonl


def split_rows(records: list[dict[str, Any]], shards: int) -> list[list[dict[str, Any]]]:
    """`shards` contiguous, nearly equal slices (fewer when there are fewer rows); none is empty."""
    n = max(1, min(shards, len(records)))
    size, extra = divmod(len(records), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(records[start:end])
        start = end
    return out


def merge_scores(shard_paths: list[str | Path], outlier_z: float, out_path: str | Path):
    """Concatenate shard score tables; recompute z-scores and outliers over all rows. Returns a `ScoreResult`."""
    import pandas as pd

    from tasks.common.nll import perplexity, robust_z
    from tasks.score import ScoreResult

    frame = pd.concat([pd.read_parquet(p) for p in shard_paths], ignore_index=True)
    frame["log_ppl_z"] = robust_z([float(x) for x in frame["nll_mean"]])
    frame["outlier"] = frame["log_ppl_z"] > outlier_z
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out_path, index=False)
    rows = frame.to_dict("records")
    nlls = [list(r["token_nll"]) for r in rows]
    return ScoreResult(rows, perplexity(nlls), int(frame["outlier"].sum()), out_path)


def merge_augmented(shard_results: list[Any], out_dir: str | Path, cfg: Any = None):
    """Concatenate shard `AugmentResult`s (in shard order) into one, written to `<out_dir>/train.jsonl`.

    With `cfg` (a FewtuneConfig), paraphrases that repeat another shard's are dropped and the shards' augmentation
    reports are merged into one.
    """
    from tasks.augment import AugmentResult, merge_shard_results

    if cfg is not None and any(r.report.get("techniques") for r in shard_results):
        return merge_shard_results(shard_results, Path(out_dir), cfg)
    records = [r for result in shard_results for r in result.records]
    notes = sorted({result.note for result in shard_results})
    note = "; ".join(notes) + f" ({len(shard_results)} shards on Dask)"
    path = write_jsonl(Path(out_dir) / "train.jsonl", records)
    return AugmentResult(records=records, added=sum(r.added for r in shard_results), path=path, note=note)
