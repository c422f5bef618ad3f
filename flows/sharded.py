"""Score and augment shard by shard on a Dask cluster (`run.task_runner: dask`).

The subflow `score_augment_sharded` cuts the training rows into contiguous shards (order kept) and scores and augments
each shard as its own task on the subflow's Dask task runner. The merged results equal what one task over all rows
produces (`tasks.score.merge_scores`, `tasks.augment.merge_augmented`: each stage owns its merge, which is so part
of its cache key). The merged results are saved as the score and augment stages' results, under the same cache keys
as when the stages run whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.results import AugmentOutput, ScoreOutput, ValidateOutput, save_output
from flows.stages import augment_output, augment_rows, retry_unless_user_error, reuse, score_rows, scores_output, stage_folder
from tasks.augment import merge_augmented
from tasks.common.records import read_jsonl, write_jsonl
from tasks.config import FewtuneConfig
from tasks.score import merge_scores


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






# ----------------------------------------------------------------------------------------------------------------
# The subflow and its shard tasks


@task(name="score-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def score_shard(cfg: FewtuneConfig, rows_path: str, base_path: str, out_path: str) -> str:
    score_rows(cfg, rows_path, base_path, out_path)
    return out_path


@task(name="augment-shard", retries=0)
def augment_shard(cfg: FewtuneConfig, rows_path: str, out_dir: str, validated: ValidateOutput, base_path: str,
                  scored: ScoreOutput | None, context_path: str, max_new_rows: int):
    return augment_rows(cfg, rows_path, Path(out_dir), validated, base_path, scored, context_path, max_new_rows)


@flow(name="score-augment-sharded")
def score_augment_sharded(
    cfg: FewtuneConfig, s_key: str, a_key: str, validated: ValidateOutput, base_path: str
) -> tuple[ScoreOutput, AugmentOutput]:
    """Score and augment the training rows shard by shard, as tasks on this subflow's Dask task runner."""
    score_dir, augment_dir = stage_folder(cfg, "score", s_key), stage_folder(cfg, "augment", a_key)
    scored, augmented = reuse(score_dir, cfg, ScoreOutput), reuse(augment_dir, cfg, AugmentOutput)
    shards = split_rows(read_jsonl(validated.train_path), cfg.run.dask_shards)
    get_run_logger().info("score and augment: %d rows in %d shards on Dask", sum(map(len, shards)), len(shards))
    score_futures, augment_futures = [], []

    def submit_augment(i: int, rows: list[dict[str, Any]], context_path: str, n: int) -> None:
        # Each shard checks duplicates against all training rows and gets its share of augment.max_new_rows.
        rows_path = str(write_jsonl(augment_dir / "shards" / str(i) / "rows.jsonl", rows))
        share = -(-cfg.augment.max_new_rows // n)
        augment_futures.append(augment_shard.submit(
            cfg, rows_path, str(augment_dir / "shards" / str(i)), validated, base_path, scored, context_path, share))

    # With score.outlier_action drop/augment, augment works on the rows the score stage passes on: after scoring.
    augment_after_score = cfg.score.outlier_action != "keep"
    for i, rows in enumerate(shards):
        if scored is None:
            rows_path = str(write_jsonl(score_dir / "shards" / str(i) / "rows.jsonl", rows))
            out = str(score_dir / "shards" / str(i) / "scores.parquet")
            score_futures.append(score_shard.submit(cfg, rows_path, base_path, out))
        if augmented is None and not augment_after_score:
            submit_augment(i, rows, validated.train_path, len(shards))
    if scored is None:
        merged = merge_scores([f.result() for f in score_futures], cfg.score.outlier_z, score_dir / "scores.parquet")
        scored = save_output(score_dir, scores_output(score_dir, merged, cfg, validated.train_path))
    if augmented is None and augment_after_score:
        after = split_rows(read_jsonl(scored.train_path), cfg.run.dask_shards)
        for i, rows in enumerate(after):
            submit_augment(i, rows, scored.train_path, len(after))
    if augmented is None:
        merged_aug = merge_augmented([f.result() for f in augment_futures], augment_dir, cfg)
        get_run_logger().info("augment: %s", merged_aug.note)
        augmented = save_output(augment_dir, augment_output(merged_aug))
    return scored, augmented


def on_dask(cfg: FewtuneConfig, s_key: str, a_key: str, validated: ValidateOutput,
            base_path: str) -> tuple[ScoreOutput, AugmentOutput]:
    """Run the sharded subflow on a Dask cluster: `run.dask_address`, else a local one of `run.dask_workers`."""
    return score_augment_sharded.with_options(task_runner=_dask_runner(cfg))(cfg, s_key, a_key, validated, base_path)


def _dask_runner(cfg: FewtuneConfig):
    from prefect_dask import DaskTaskRunner

    if cfg.run.dask_address:
        return DaskTaskRunner(address=cfg.run.dask_address)
    cluster = {
        "n_workers": cfg.run.dask_workers,
        "threads_per_worker": 1,
        "processes": cfg.run.dask_processes,
        "dashboard_address": None,
        "preload": ["flows.dask_worker"],  # imports done while the cluster starts, not in the first shard task
    }
    return DaskTaskRunner(cluster_kwargs=cluster)
