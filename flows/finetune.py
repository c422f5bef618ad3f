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

from tasks.config import ConfigError, FewtuneConfig, load_config
from tasks.common import cache
from tasks.common.records import DataError, content_hash, load_records, read_jsonl, write_jsonl
from tasks.health import assess_train_dir
from tasks.common.landing import materialize
from tasks.common.models import EncodingError, ModelError, resolve_base_model
from tasks.common.tracking import check_trackers
from tasks.train import TrainingError, resolve_init_adapter
from tasks.validate import ValidationFailed, summary_line

USER_ERRORS = (ConfigError, DataError, ModelError, EncodingError, ValidationFailed, TrainingError)


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
def validate_stage(cfg: FewtuneConfig, key: str, base_path: str) -> dict[str, Any]:
    from tasks.common.models import load_tokenizer
    from tasks.validate import validate_dataset

    folder = cache.stage_dir(cfg.run.runs_dir, "validate", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    train = load_records(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    evals = load_records(cfg.data.eval, cfg.data.format, cfg.data.system_prompt) if cfg.data.eval else None
    tokenizer = load_tokenizer(base_path) if cfg.validate_.token_checks else None
    try:
        result = validate_dataset(train, evals, cfg, folder, tokenizer=tokenizer)
    except ValidationFailed as exc:
        _validation_artifact(cfg, json.loads(exc.report_path.read_text(encoding="utf-8")))
        raise
    probe_path = None
    if cfg.data.probe:
        probe = load_records(cfg.data.probe, "auto", cfg.data.system_prompt)
        from tasks.common.records import write_jsonl

        probe_path = str(write_jsonl(folder / "probe.jsonl", probe.records))
    get_run_logger().info("validate: %s", summary_line(result.summary(), details=True))
    return cache.save_result(
        folder,
        {
            "train_path": str(result.train_path),
            "eval_path": str(result.eval_path),
            "probe_path": probe_path,
            "quarantine_path": str(result.quarantine_path),
            "report_path": str(result.report_path),
            "warnings_path": str(result.warnings_path),
            "docs_path": str(result.docs_path.parent),
            "train_hash": content_hash(result.train),
            "eval_hash": content_hash(result.eval),
            "summary": result.summary(),
        },
    )


def _validation_artifact(cfg: FewtuneConfig, report: dict[str, Any]) -> None:
    """The validate stage's counts per check as a Prefect table artifact (also when the data is not usable)."""
    from prefect.artifacts import create_table_artifact

    from tasks.validate import check_rows

    files = "; ".join(
        f"{role} `{f['path']}`: {f['rows_in']} in, {f['rows_kept']} kept, {f['rows_quarantined']} quarantined"
        for role, f in report["files"].items()
    )
    status = "usable" if report["usable"] else "**not usable**: " + " ".join(p.splitlines()[0] for p in report["problems"])
    key = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    create_table_artifact(check_rows(report), key=f"{key}-validation", description=f"fewtune validation: {status}. {files}")


@_stage("score")
def score_stage(cfg: FewtuneConfig, key: str, validated: dict[str, Any], base_path: str) -> dict[str, Any]:
    from tasks.common.models import load_model, load_tokenizer, pick_dtype
    from tasks.score import score_records, scoring_options

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
        out_path=folder / "scores.parquet",
        **scoring_options(cfg.score),
    )
    return _save_scores(folder, result, cfg, validated["train_path"])


def _save_scores(folder: Path, result, cfg: FewtuneConfig, train_path: str) -> dict[str, Any]:
    """STM masks, the outlier action and the score report; `train_path` in the result: the rows passed on."""
    from tasks.score import finish_scores

    return cache.save_result(folder, finish_scores(result, read_jsonl(train_path), cfg.score, folder))


@_stage("augment", retries=0)
def augment_stage(
    cfg: FewtuneConfig, key: str, validated: dict[str, Any], base_path: str, scored: dict[str, Any] | None = None
) -> dict[str, Any]:
    folder = cache.stage_dir(cfg.run.runs_dir, "augment", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    result = _augment(cfg, validated["train_path"], folder, validated, base_path, scored)
    get_run_logger().info("augment: %s", result.note)
    return _save_augmented(folder, result)


def _augment(cfg: FewtuneConfig, rows_path: str, out_dir: Path, validated: dict[str, Any], base_path: str,
             scored: dict[str, Any] | None, context_path: str | None = None, max_new_rows: int | None = None):
    """augment_records on the rows at `rows_path`: eval rows for the leakage re-check, score outliers to rewrite."""
    from tasks.augment import augment_records

    scored = scored or {}
    return augment_records(
        read_jsonl(rows_path), cfg, Path(out_dir), base_path=base_path, eval_records=read_jsonl(validated["eval_path"]),
        outlier_ids=scored.get("augment_ids") or (), scores_path=scored.get("scores_path"),
        context_records=read_jsonl(context_path) if context_path else None, max_new_rows=max_new_rows,
    )


def _save_augmented(folder: Path, result) -> dict[str, Any]:
    return cache.save_result(
        folder,
        {
            "train_path": str(result.path),
            "train_hash": content_hash(result.records),
            "report_path": str(result.report_path) if result.report_path else None,
            "markdown_path": str(result.markdown_path) if result.markdown_path else None,
            "rejected_path": str(result.rejected_path) if result.rejected_path else None,
            "summary": result.summary(),
        },
    )


def _probe_and_replay(cfg: FewtuneConfig, validated: dict[str, Any] | None) -> tuple[list | None, list | None]:
    """Replay rows against forgetting: data.replay, else part of the probe set (train_adapter splits it)."""
    probe = read_jsonl(validated["probe_path"]) if validated and validated.get("probe_path") else None
    replay = load_records(cfg.data.replay, "auto", cfg.data.system_prompt).records if cfg.data.replay else None
    return probe, replay


@_stage("cv")
def cv_stage(
    cfg: FewtuneConfig, key: str, augmented: dict[str, Any], base_path: str, validated: dict[str, Any] | None = None,
    token_masks: str | None = None,
) -> dict[str, Any]:
    """k-fold cross-validation (cv.folds > 1): k adapters and their metrics' mean ± spread, before the final adapter."""
    from flows.cv import cross_validate, cv_line

    folder = cache.stage_dir(cfg.run.runs_dir, "cv", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    probe, replay = _probe_and_replay(cfg, validated)
    result = cross_validate(read_jsonl(augmented["train_path"]), cfg, base_path, folder, probe=probe, replay=replay, token_masks=token_masks)
    get_run_logger().info("cv: %s", cv_line(result.to_dict()))
    return cache.save_result(folder, result.to_dict())


@_stage("train")
def train_stage(
    cfg: FewtuneConfig,
    key: str,
    augmented: dict[str, Any],
    base_path: str,
    validated: dict[str, Any] | None = None,
    init_adapter: str | None = None,
    token_masks: str | None = None,
) -> dict[str, Any]:
    from tasks.train import train_adapter, train_adapter_launched

    folder = cache.stage_dir(cfg.run.runs_dir, "train", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    probe, replay = _probe_and_replay(cfg, validated)
    run = train_adapter_launched if cfg.train.num_processes > 1 else train_adapter
    result = run(
        read_jsonl(augmented["train_path"]), cfg, base_path, folder, probe=probe, replay=replay, init_adapter=init_adapter,
        token_masks=token_masks,  # STM masks (score.token_masking), applied in the data collator
    )
    get_run_logger().info(
        "train: %s, best validation loss %s at step %s of %s (%s, %s tokens/s)",
        result.method,
        result.best_val_loss,
        result.best_step,
        result.steps,
        result.stop_reason,
        result.tokens_per_s,
    )
    return cache.save_result(folder, result.to_dict())


@_stage("evaluate")
def evaluate_stage(
    cfg: FewtuneConfig, key: str, validated: dict[str, Any], trained: dict[str, Any], base_path: str, train_path: str
) -> dict[str, Any]:
    from tasks.evaluate import evaluate_models

    folder = cache.stage_dir(cfg.run.runs_dir, "evaluate", key)
    if (found := _reuse(folder, cfg)) is not None:
        return found
    # When training replayed part of the probe set, forgetting is measured on the other part only.
    probe_path = trained.get("probe_eval_path") or validated.get("probe_path")
    probe = read_jsonl(probe_path) if probe_path else None
    result = evaluate_models(
        read_jsonl(validated["eval_path"]), probe, cfg, base_path, trained["adapter_path"], folder,
        train_records=read_jsonl(train_path),  # the rows training received: memorization and rephrasing checks
    )
    get_run_logger().info("evaluate: %s s (%s)", result.seconds["total"], json.dumps(result.seconds))
    return cache.save_result(folder, result.to_dict())



@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def register_stage(
    cfg: FewtuneConfig,
    run_name: str,
    trained: dict[str, Any],
    evaluated: dict[str, Any],
    base_path: str,
    lineage: dict[str, str],
    eval_path: str,
    artifacts: dict[str, str],
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
        eval_records=read_jsonl(eval_path),
        artifacts=artifacts,
    )
    return result.to_dict()


@task(name="report", retries=0)
def report_stage(cfg: FewtuneConfig, run_dir: str, summary: dict[str, Any], evaluated: dict[str, Any]) -> str:
    """report.html in the run folder, attached to the MLflow run, and the same summary as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.register import log_artifacts
    from tasks.report import summary_markdown, summary_rows, write_report

    path = write_report(run_dir)
    if summary.get("register"):
        log_artifacts(cfg, summary["register"]["run_id"], [path])
    key = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    create_markdown_artifact(summary_markdown(summary, evaluated, str(path)), key=f"{key}-summary", description="fewtune run summary and gate")
    create_table_artifact(summary_rows(evaluated), key=f"{key}-metrics", description="baseline vs tuned with bootstrap intervals")
    if summary.get("health"):
        from tasks.health import health_markdown

        create_markdown_artifact(health_markdown(summary["health"], summary["run_name"]), key=f"{key}-health",
                                 description="fewtune training health: warning signs and what to change")
    get_run_logger().info("report: %s", path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Scaling out: score and augment as sharded tasks on a Dask cluster (run.task_runner: dask)


@task(name="score-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def score_shard(cfg: FewtuneConfig, rows_path: str, base_path: str, out_path: str) -> str:
    from tasks.common.models import load_model, load_tokenizer, pick_dtype
    from tasks.score import score_records, scoring_options

    tokenizer = load_tokenizer(base_path)
    model = load_model(base_path, dtype=pick_dtype(cfg.model.dtype))
    score_records(
        read_jsonl(rows_path),
        model,
        tokenizer,
        max_length=cfg.model.max_length,
        out_path=Path(out_path),
        **scoring_options(cfg.score),
    )
    return out_path


@task(name="augment-shard", retries=0)
def augment_shard(cfg: FewtuneConfig, rows_path: str, out_dir: str, validated: dict[str, Any], base_path: str,
                  scored: dict[str, Any] | None, context_path: str, max_new_rows: int):
    return _augment(cfg, rows_path, Path(out_dir), validated, base_path, scored, context_path, max_new_rows)


@flow(name="score-augment-sharded")
def score_augment_sharded(
    cfg: FewtuneConfig, s_key: str, a_key: str, validated: dict[str, Any], base_path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score and augment the training rows shard by shard, as tasks on this subflow's Dask task runner."""
    from flows.sharded import merge_augmented, merge_scores, split_rows

    score_dir = cache.stage_dir(cfg.run.runs_dir, "score", s_key)
    augment_dir = cache.stage_dir(cfg.run.runs_dir, "augment", a_key)
    scored, augmented = _reuse(score_dir, cfg), _reuse(augment_dir, cfg)
    shards = split_rows(read_jsonl(validated["train_path"]), cfg.run.dask_shards)
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
            submit_augment(i, rows, validated["train_path"], len(shards))
    if scored is None:
        merged = merge_scores([f.result() for f in score_futures], cfg.score.outlier_z, score_dir / "scores.parquet")
        scored = _save_scores(score_dir, merged, cfg, validated["train_path"])
    if augmented is None and augment_after_score:
        after = split_rows(read_jsonl(scored["train_path"]), cfg.run.dask_shards)
        for i, rows in enumerate(after):
            submit_augment(i, rows, scored["train_path"], len(after))
    if augmented is None:
        merged_aug = merge_augmented([f.result() for f in augment_futures], augment_dir, cfg)
        get_run_logger().info("augment: %s", merged_aug.note)
        augmented = _save_augmented(augment_dir, merged_aug)
    return scored, augmented


def _dask_runner(cfg: FewtuneConfig):
    from prefect_dask import DaskTaskRunner

    if cfg.run.dask_address:
        return DaskTaskRunner(address=cfg.run.dask_address)
    cluster = {
        "n_workers": cfg.run.dask_workers,
        "threads_per_worker": 1,
        "processes": cfg.run.dask_processes,
        "dashboard_address": None,
    }
    return DaskTaskRunner(cluster_kwargs=cluster)


def _has_result(cfg: FewtuneConfig, stage: str, key: str) -> bool:
    """Whether the stage will be a cache hit (its complete result for this key is on disk)."""
    return not cfg.run.refresh_cache and cache.load_result(cache.stage_dir(cfg.run.runs_dir, stage, key)) is not None


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


def augment_key(cfg: FewtuneConfig, validated: dict[str, Any], base, outlier_key: str | None) -> str:
    """Cache key of the augment stage: training and eval rows (leakage re-check), base model, the augment section
    (generator settings included), model and validate sections (prompt length, duplicate and leakage rules), a local
    generator's weights, the score outliers sent to augment, and the code."""
    generator = cfg.augment.generator
    used = cfg.augment.enabled or cfg.score.outlier_action == "augment"
    gen_key = resolve_base_model(generator.model).fingerprint if used and generator.kind == "local" and generator.model else None
    code = cache.code_hash("tasks/augment/", "tasks/common/models.py", "tasks/score/", "data_checks/similarity.py", "data_checks/checks.py")
    return cache.hash_text(validated["train_hash"], validated["eval_hash"], base.fingerprint,
                           cfg.section_hash("augment", "model", "validate"), gen_key, outlier_key, code)


def run_name_for(cfg: FewtuneConfig) -> str:
    return cfg.run.name or f"{cfg.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


@flow(name="finetune")
def finetune(
    config_path: str | None = None, overrides: list[str] | None = None, dataset: str | None = None
) -> dict[str, Any]:
    """Validate, score, augment, train, evaluate and register; returns the run summary.

    `dataset` (a path, file:// or object-store URI) replaces the config's `data.train`: deployments pass the
    landed dataset this way.
    """
    cfg = load_config(config_path, overrides or [])
    check_trackers(cfg)  # a tracker in train.report_to that is not installed stops the run before any work
    if dataset:
        local = materialize(dataset, Path(cfg.run.runs_dir).resolve() / ".landing")
        cfg.data.train = str(Path(local).resolve()) if Path(local).exists() else local
        get_run_logger().info("dataset: %s", dataset)
    run_name = run_name_for(cfg)
    run_dir = Path(cfg.run.runs_dir).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))

    base = resolve_base_model(cfg.model.base)
    data_key = [cache.source_fingerprint(s) for s in (cfg.data.train, cfg.data.eval, cfg.data.probe)]
    v_key = cache.hash_text(data_key, cfg.section_hash("data", "validate"), base.fingerprint, cfg.model.max_length, cache.code_hash("tasks/validate/", "tasks/common/records.py", "data_checks"))
    hits = {"validate": _has_result(cfg, "validate", v_key)}
    validated = validate_stage(cfg, v_key, base.path)
    _validation_artifact(cfg, json.loads(Path(validated["report_path"]).read_text(encoding="utf-8")))

    s_key = cache.hash_text(validated["train_hash"], base.fingerprint, cfg.section_hash("model", "score"), cache.code_hash("tasks/score/", "tasks/common/models.py"))
    outlier_key = s_key if cfg.score.outlier_action != "keep" else None  # outliers dropped or sent to augment
    a_key = augment_key(cfg, validated, base, outlier_key)
    hits["score"], hits["augment"] = _has_result(cfg, "score", s_key), _has_result(cfg, "augment", a_key)
    if cfg.run.task_runner == "dask" and not (hits["score"] and hits["augment"]):
        scored, augmented = score_augment_sharded.with_options(task_runner=_dask_runner(cfg))(cfg, s_key, a_key, validated, base.path)
    else:
        scored = score_stage(cfg, s_key, validated, base.path)
        augmented = augment_stage(cfg, a_key, {**validated, "train_path": scored["train_path"]}, base.path, scored)  # rows score passes on

    init = resolve_init_adapter(cfg)  # incremental mode: e.g. the current champion's adapter
    replay_key = [data_key[2], cache.source_fingerprint(cfg.data.replay), init.fingerprint if init else None]
    t_key = cache.hash_text(augmented["train_hash"], base.fingerprint, cfg.section_hash("model", "train"), replay_key, scored.get("token_masks_hash"), cache.code_hash("tasks/train/", "tasks/common/models.py", "tasks/common/stm.py", "tasks/common/records.py"))
    cv = None
    if cfg.cv.folds > 1:  # k-fold cross-validation first; then the final adapter on all rows
        cv_key = cache.hash_text(t_key, cfg.section_hash("cv", "evaluate", "score"), cache.code_hash("tasks/cv.py", "tasks/evaluate/", "metrics"))
        cv = cv_stage(cfg, cv_key, augmented, base.path, validated, scored.get("token_masks_path"))
    hits["train"] = _has_result(cfg, "train", t_key)
    trained = train_stage(cfg, t_key, augmented, base.path, validated, init.path if init else None, scored.get("token_masks_path"))

    e_key = cache.hash_text(t_key, validated["eval_hash"], data_key[2], cfg.section_hash("model", "evaluate", "score"), cache.code_hash("tasks/evaluate/", "metrics"))
    hits["evaluate"] = _has_result(cfg, "evaluate", e_key)
    evaluated = evaluate_stage(cfg, e_key, validated, trained, base.path, augmented["train_path"])
    unchanged = hits["train"] and hits["evaluate"]
    if unchanged:
        get_run_logger().info(
            "unchanged data: nothing to retrain (training rows, config, base model and code match an earlier run; "
            "reused: %s)",
            ", ".join(stage for stage, hit in hits.items() if hit),
        )

    for src in (validated["train_path"], validated["eval_path"], validated["quarantine_path"], validated["report_path"], validated.get("warnings_path")):
        _copy_into(run_dir / "data", src)
    _copy_into(run_dir, validated.get("docs_path"), "data_docs")
    for src in (scored["scores_path"], scored.get("outliers_path"), scored.get("report_path"), scored.get("histogram_path")):
        _copy_into(run_dir, src)
    if augmented.get("report_path"):  # augmentation ran: its report, the rows passed to training, the rejected candidates
        for src in (augmented["report_path"], augmented.get("markdown_path")):
            _copy_into(run_dir, src)
        _copy_into(run_dir / "data", augmented["train_path"], "augmented.jsonl")
        _copy_into(run_dir / "data", augmented.get("rejected_path"), "augment_rejected.jsonl")
    _copy_into(run_dir, trained["adapter_path"], "adapter")
    for name in ("train_log.json", "train_plan.json", "train_result.json", "tensorboard"):
        _copy_into(run_dir, str(Path(trained["adapter_path"]).parent / name))
    _copy_into(run_dir, (cv or {}).get("path"))
    health = assess_train_dir(Path(trained["adapter_path"]).parent, evaluated, cfg).to_dict()
    _copy_into(run_dir, evaluated["predictions_path"])
    _copy_into(run_dir, str(Path(evaluated["predictions_path"]).parent / "probe_predictions.jsonl"))
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
        artifacts = {name: str(run_dir / name) for name in ("data", "data_docs", "predictions.jsonl", "probe_predictions.jsonl", "train_log.json", "config.yaml")}
        registered = register_stage(cfg, run_name, trained, evaluated, base.path, lineage, validated["eval_path"], artifacts)

    summary = {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "base_model": cfg.model.base,
        "validate": validated["summary"],
        "score": scored["summary"],
        "augment": augmented["summary"],
        "train": {k: trained[k] for k in ("method", "train_rows", "validation_rows", "best_val_loss", "best_step", "steps", "epochs_run", "stopped_early", "tokens_per_s", "seconds", "stop_reason", "replay_rows")},
        "evaluate": {
            k: evaluated.get(k)
            for k in ("task", "primary_metric", "n_examples", "baseline", "tuned", "gain", "intervals", "overmemorization",
                      "forgetting", "memorization", "robustness", "seconds")
        },
        "examples": evaluated["examples"],
        "register": registered,
        "gate": registered["gate"] if registered else _gate_without_registry(evaluated, cfg),
        "health": health,
        "cv": cv,
        "unchanged": unchanged,
        "report": str(run_dir / "report.html"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report_stage(cfg, str(run_dir), summary, evaluated)
    return summary


def _gate_without_registry(evaluated: dict[str, Any], cfg: FewtuneConfig) -> dict[str, Any]:
    """The gate's criteria for the report when registration is off (no champion to compare with)."""
    from tasks.register import gate_decision

    return gate_decision(evaluated, cfg, None).to_dict()


__all__ = ["finetune", "USER_ERRORS", "run_name_for", "augment_key"]
