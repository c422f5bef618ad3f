"""The fewtune DAG: validate → score → augment → train → evaluate → register.

This module only wires stages together. Each stage is a thin Prefect task around a plain function in `tasks/`,
with retries (not for bad data or bad config: retrying cannot fix those) and a content-hash cache key: a stage whose
inputs, config slice, base model and code are unchanged is skipped, so a nightly run on unchanged data finishes in
seconds, and a run that crashed resumes where it stopped.

Stage outputs live in `<runs_dir>/.cache/<stage>-<key>/`; the run folder `<runs_dir>/<run-name>/` gets the config
used, the validated and quarantined rows, the scores, the adapter, the eval results and `summary.json`.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from flows.config import ConfigError, FewtuneConfig, load_config
from tasks import cache
from tasks.data import DataError, content_hash, load_records, read_jsonl
from tasks.models import EncodingError, ModelError, resolve_base_model
from tasks.validate import ValidationFailed

USER_ERRORS = (ConfigError, DataError, ModelError, EncodingError, ValidationFailed)


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes (e.g. out of memory, a killed worker) but not errors in the user's data or config."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


def _cached(stage: str):
    """cache_key_fn: the stage key when that stage's result folder is complete, else None (run the stage)."""

    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        if parameters["cfg"].run.refresh_cache:
            return None
        folder = cache.stage_dir(parameters["cfg"].run.runs_dir, stage, parameters["key"])
        return f"fewtune-{stage}-{parameters['key']}" if cache.load_result(folder) is not None else None

    return key_fn


def _stage(stage: str, retries: int = 1):
    return task(
        name=stage,
        retries=retries,
        retry_delay_seconds=5,
        retry_condition_fn=_retry_unless_user_error,
        cache_key_fn=_cached(stage),
        persist_result=True,
    )


def _reuse(folder: Path, cfg: FewtuneConfig) -> dict[str, Any] | None:
    """A complete earlier result of the same stage and key (a crash after the stage but before Prefect recorded it)."""
    if cfg.run.refresh_cache:
        return None
    found = cache.load_result(folder)
    if found is not None:
        get_run_logger().info("inputs unchanged: reusing %s", folder)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Stages


@_stage("validate", retries=0)
def validate_stage(cfg: FewtuneConfig, key: str) -> dict[str, Any]:
    from tasks.validate import validate_dataset

    folder = cache.stage_dir(cfg.run.runs_dir, "validate", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    train = load_records(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    evals = load_records(cfg.data.eval, cfg.data.format, cfg.data.system_prompt) if cfg.data.eval else None
    result = validate_dataset(train, evals, cfg, folder)
    probe_path = None
    if cfg.data.probe:
        probe = load_records(cfg.data.probe, "auto", cfg.data.system_prompt)
        from tasks.data import write_jsonl

        probe_path = str(write_jsonl(folder / "probe.jsonl", probe.records))
    get_run_logger().info("validate: %s", json.dumps(result.summary()))
    return cache.save_result(
        folder,
        {
            "train_path": str(result.train_path),
            "eval_path": str(result.eval_path),
            "probe_path": probe_path,
            "quarantine_path": str(result.quarantine_path),
            "report_path": str(result.report_path),
            "train_hash": content_hash(result.train),
            "eval_hash": content_hash(result.eval),
            "summary": result.summary(),
        },
    )


@_stage("score")
def score_stage(cfg: FewtuneConfig, key: str, validated: dict[str, Any], base_path: str) -> dict[str, Any]:
    from tasks.models import load_model, load_tokenizer, pick_dtype
    from tasks.score import score_records

    folder = cache.stage_dir(cfg.run.runs_dir, "score", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    tokenizer = load_tokenizer(base_path)
    model = load_model(base_path, dtype=pick_dtype(cfg.model.dtype))
    result = score_records(
        read_jsonl(validated["train_path"]),
        model,
        tokenizer,
        max_length=cfg.model.max_length,
        batch_size=cfg.score.batch_size,
        outlier_z=cfg.score.outlier_z,
        out_path=folder / "scores.parquet",
    )
    return cache.save_result(folder, {"scores_path": str(result.path), "summary": result.summary()})


@_stage("augment", retries=0)
def augment_stage(cfg: FewtuneConfig, key: str, validated: dict[str, Any]) -> dict[str, Any]:
    from tasks.augment import augment_records

    folder = cache.stage_dir(cfg.run.runs_dir, "augment", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    result = augment_records(read_jsonl(validated["train_path"]), cfg, folder)
    get_run_logger().info("augment: %s", result.note)
    return cache.save_result(
        folder,
        {
            "train_path": str(result.path),
            "train_hash": content_hash(result.records),
            "summary": {"rows": len(result.records), "added": result.added, "note": result.note},
        },
    )


@_stage("train")
def train_stage(cfg: FewtuneConfig, key: str, augmented: dict[str, Any], base_path: str) -> dict[str, Any]:
    from tasks.train import train_adapter

    folder = cache.stage_dir(cfg.run.runs_dir, "train", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    result = train_adapter(read_jsonl(augmented["train_path"]), cfg, base_path, folder)
    get_run_logger().info(
        "train: best validation loss %s at step %s of %s (%s tokens/s)",
        result.best_val_loss,
        result.best_step,
        result.steps,
        result.tokens_per_s,
    )
    return cache.save_result(folder, result.to_dict())


@_stage("evaluate")
def evaluate_stage(
    cfg: FewtuneConfig, key: str, validated: dict[str, Any], trained: dict[str, Any], base_path: str
) -> dict[str, Any]:
    from tasks.evaluation import evaluate_models

    folder = cache.stage_dir(cfg.run.runs_dir, "evaluate", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    probe = read_jsonl(validated["probe_path"]) if validated.get("probe_path") else None
    result = evaluate_models(
        read_jsonl(validated["eval_path"]), probe, cfg, base_path, trained["adapter_path"], folder
    )
    return cache.save_result(folder, result.to_dict())


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def register_stage(
    cfg: FewtuneConfig,
    run_name: str,
    trained: dict[str, Any],
    evaluated: dict[str, Any],
    base_path: str,
    lineage: dict[str, str],
) -> dict[str, Any]:
    from tasks.register import register_model

    result = register_model(
        cfg,
        run_name=run_name,
        adapter_path=trained["adapter_path"],
        base_path=base_path,
        base_spec=cfg.model.base,
        evaluation=evaluated,
        lineage=lineage,
        system_prompt=cfg.data.system_prompt,
    )
    return result.to_dict()


# ----------------------------------------------------------------------------------------------------------------
# The flow


def _copy_into(run_dir: Path, src: str | None, name: str | None = None) -> None:
    if not src:
        return
    path = Path(src)
    target = run_dir / (name or path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
    elif path.exists():
        shutil.copy2(path, target)


def run_name_for(cfg: FewtuneConfig) -> str:
    return cfg.run.name or f"{cfg.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


@flow(name="fewtune")
def finetune(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate, score, augment, train, evaluate and register; returns the run summary."""
    cfg = load_config(config_path, overrides or [])
    run_name = run_name_for(cfg)
    run_dir = Path(cfg.run.runs_dir).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))

    base = resolve_base_model(cfg.model.base)
    data_key = [cache.source_fingerprint(s) for s in (cfg.data.train, cfg.data.eval, cfg.data.probe)]
    v_key = cache.hash_text(data_key, cfg.section_hash("data", "validate"), cache.code_hash("tasks/validate.py", "tasks/data.py", "data_checks"))
    validated = validate_stage(cfg, v_key)

    s_key = cache.hash_text(validated["train_hash"], base.fingerprint, cfg.section_hash("model", "score"), cache.code_hash("tasks/score.py", "tasks/models.py"))
    scored = score_stage(cfg, s_key, validated, base.path)

    a_key = cache.hash_text(validated["train_hash"], base.fingerprint, cfg.section_hash("augment"), cache.code_hash("tasks/augment.py"))
    augmented = augment_stage(cfg, a_key, validated)

    t_key = cache.hash_text(augmented["train_hash"], base.fingerprint, cfg.section_hash("model", "train"), cache.code_hash("tasks/train.py", "tasks/models.py"))
    trained = train_stage(cfg, t_key, augmented, base.path)

    e_key = cache.hash_text(t_key, validated["eval_hash"], data_key[2], cfg.section_hash("model", "evaluate", "score"), cache.code_hash("tasks/evaluation.py", "metrics"))
    evaluated = evaluate_stage(cfg, e_key, validated, trained, base.path)

    for src in (validated["train_path"], validated["eval_path"], validated["quarantine_path"], validated["report_path"]):
        _copy_into(run_dir / "data", src)
    _copy_into(run_dir, scored["scores_path"])
    _copy_into(run_dir, trained["adapter_path"], "adapter")
    _copy_into(run_dir, str(Path(trained["adapter_path"]).parent / "train_log.json"))
    _copy_into(run_dir, evaluated["predictions_path"])
    (run_dir / "eval_results.json").write_text(json.dumps(evaluated, indent=2))

    registered = None
    if cfg.register_.enabled:
        lineage = {
            "run_name": run_name,
            "run_dir": str(run_dir),
            "train_key": t_key,
            "data_train_hash": validated["train_hash"],
            "data_eval_hash": validated["eval_hash"],
            "base_model": cfg.model.base,
            "base_fingerprint": base.fingerprint,
        }
        registered = register_stage(cfg, run_name, trained, evaluated, base.path, lineage)

    summary = {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "base_model": cfg.model.base,
        "validate": validated["summary"],
        "score": scored["summary"],
        "augment": augmented["summary"],
        "train": {k: trained[k] for k in ("method", "train_rows", "validation_rows", "best_val_loss", "best_step", "steps", "epochs_run", "stopped_early", "tokens_per_s", "seconds")},
        "evaluate": {k: evaluated[k] for k in ("primary_metric", "n_examples", "baseline", "tuned", "gain")},
        "examples": evaluated["examples"],
        "register": registered,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["finetune", "USER_ERRORS", "run_name_for"]
