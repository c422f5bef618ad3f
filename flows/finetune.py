"""The fewtune DAG: validate → score → augment → (cv) → train → evaluate → register → report.

This module only wires stages together. Each stage is a Prefect task (`flows/stages.py`) around a plain function in
`tasks/<stage>/`, with retries (not for bad data or bad config) and a cache key (`flows/stage_keys.py`) built from
content hashes: a stage whose inputs, config sections, base model and code are unchanged is skipped, so a nightly run
on unchanged data finishes in seconds, and a run that crashed resumes where it stopped.

Stage outputs live in `<runs_dir>/.cache/<stage>-<key>/`; the run folder `<runs_dir>/<run-name>/` gets copies of them,
`eval_results.json` and `summary.json` (`flows/run_folder.py`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import run_folder, sharded, stage_keys
from flows.stages import (
    USER_ERRORS,
    CacheHits,
    augment_stage,
    cv_stage,
    evaluate_stage,
    register_stage,
    report_stage,
    score_stage,
    train_stage,
    validate_stage,
    validation_artifact,
)
from tasks.common.landing import admit_dataset, materialize
from tasks.common.models import resolve_base_model
from tasks.config import FewtuneConfig, load_config
from tasks.doctor.preflight import preflight
from tasks.train import resolve_init_adapter


def run_name_for(cfg: FewtuneConfig) -> str:
    return cfg.run.name or f"{cfg.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def use_dataset(cfg: FewtuneConfig, dataset: str) -> None:
    """Train on `dataset` (a path, file:// or object-store URI) instead of the config's `data.train`.

    The receiver's rules apply first (`webhook.allowed_uris`, `webhook.max_dataset_bytes`): an event or a run
    parameter naming data elsewhere, or too much of it, fails here with one `DataError` before anything is read."""
    where = admit_dataset(dataset, cfg.webhook.allowed_uris, cfg.webhook.max_dataset_bytes)
    source = str(where.local) if where.local is not None else dataset  # the checked path (symlinks resolved)
    local = materialize(source, Path(cfg.run.runs_dir).resolve() / ".landing", max_bytes=cfg.webhook.max_dataset_bytes)
    cfg.data.train = str(Path(local).resolve()) if Path(local).exists() else local
    get_run_logger().info("dataset: %s", dataset)


@flow(name="finetune")
def finetune(
    config_path: str | None = None, overrides: list[str] | None = None, dataset: str | None = None
) -> dict[str, Any]:
    """Validate, score, augment, train, evaluate and register; returns the run summary.

    `dataset` (a path, file:// or object-store URI) replaces the config's `data.train`: deployments pass the
    landed dataset this way.
    """
    cfg = load_config(config_path, overrides or [])
    if dataset:
        use_dataset(cfg, dataset)
    preflight(cfg)  # every problem that would stop the run later (files, packages, hardware, registry), at once
    run = run_folder.start(cfg, run_name_for(cfg))
    base, data = resolve_base_model(cfg.model.base), stage_keys.data_fingerprints(cfg)
    hits = CacheHits(cfg)  # which stages reuse an earlier result

    validated = validate_stage(cfg, hits.check("validate", stage_keys.validate_key(cfg, base, data)), base.path)
    validation_artifact(cfg, validated.report_path)

    s_key = hits.check("score", stage_keys.score_key(cfg, validated, base))
    a_key = hits.check("augment", stage_keys.augment_key(cfg, validated.train_hash, validated.eval_hash, base,
                                                         stage_keys.outlier_key(cfg, s_key)))
    if cfg.run.task_runner == "dask" and not hits.all("score", "augment"):
        scored, augmented = sharded.on_dask(cfg, s_key, a_key, validated, base.path)
    else:
        scored = score_stage(cfg, s_key, validated, base.path)
        augmented = augment_stage(cfg, a_key, validated, scored, base.path)  # on the rows score passes on

    init = resolve_init_adapter(cfg)  # incremental mode: e.g. the current champion's adapter
    t_key = stage_keys.train_key(cfg, augmented, scored, base, data, init.fingerprint if init else None)
    cv = None
    if cfg.cv.folds > 1:  # k-fold cross-validation first; then the final adapter on all rows
        cv = cv_stage(cfg, stage_keys.cv_key(cfg, t_key), augmented, base.path, validated, scored.token_masks_path)
    trained = train_stage(cfg, hits.check("train", t_key), augmented, base.path, validated,
                          init.path if init else None, scored.token_masks_path)
    e_key = hits.check("evaluate", stage_keys.evaluate_key(cfg, t_key, validated, data))
    evaluated = evaluate_stage(cfg, e_key, validated, trained, base.path, augmented.train_path)
    unchanged = hits.unchanged()  # training and evaluation reused: nothing retrained

    health = run_folder.collect(run.dir, validated, scored, augmented, trained, evaluated, cv, cfg)
    registered = register_stage(cfg, run, t_key, e_key, base, validated, trained, evaluated) if cfg.register_.enabled else None
    summary = run_folder.summarize(cfg, run, validated, scored, augmented, trained, evaluated, cv, registered, health, unchanged)
    run_folder.write_summary(run.dir, summary)
    report_stage(cfg, str(run.dir), summary, evaluated)
    return summary


__all__ = ["finetune", "USER_ERRORS", "run_name_for"]
