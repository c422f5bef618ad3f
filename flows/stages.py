"""One Prefect task per stage, each a thin shell around the stage's plain entry point in `tasks/<stage>/`.

A cached stage (`@stage`) writes its outputs into `<runs_dir>/.cache/<stage>-<key>/` and its typed record
(`flows.results`) into that folder's `result.json`. It runs only when no complete result exists for its key: Prefect
skips it when it recorded one (its cache key), and the stage itself reuses a `result.json` that a crash after the
stage but before Prefect's record left behind. Crashes are retried; errors in the user's data or config are not,
since retrying cannot fix them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext

from flows.cv import cross_validate, cv_line
from flows.keys import stage_code_hash
from flows.results import (
    OUTPUTS,
    AugmentOutput,
    CVOutput,
    EvalOutput,
    Output,
    ScoreOutput,
    StageOutput,
    TrainOutput,
    ValidateOutput,
    load_output,
    save_output,
)
from flows.run_folder import Run, lineage, registered_files
from tasks.augment import augment_records
from tasks.common import cache
from tasks.common.general_probe import load_general_probe
from tasks.common.models import EncodingError, ModelError, ResolvedModel, load_base, load_tokenizer, resolve_base_model
from tasks.common.records import DataError, content_hash, load_records, read_jsonl, write_jsonl
from tasks.config import ConfigError, FewtuneConfig
from tasks.evaluate import baseline_cache_for, evaluate_models
from tasks.health import health_markdown
from tasks.register import log_artifacts, register_model
from tasks.report import summary_markdown, summary_rows, write_report
from tasks.score import finish_scores, score_records, scoring_options
from tasks.train import TrainingError, train_adapter, train_adapter_launched
from tasks.validate import ValidationFailed, check_rows, summary_line, validate_dataset

USER_ERRORS = (ConfigError, DataError, ModelError, EncodingError, ValidationFailed, TrainingError)


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes (e.g. out of memory, a killed worker) but not errors in the user's data or config."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


def stage_folder(cfg: FewtuneConfig, stage: str, key: str) -> Path:
    return cache.stage_dir(cfg.run.runs_dir, stage, key)


def has_result(cfg: FewtuneConfig, stage: str, key: str) -> bool:
    """Whether the stage will be a cache hit (its complete result for this key is on disk)."""
    return not cfg.run.refresh_cache and load_output(stage_folder(cfg, stage, key), OUTPUTS[stage]) is not None


class CacheHits:
    """Which stages of this run reuse an earlier result, noted before each stage runs."""

    def __init__(self, cfg: FewtuneConfig):
        self.cfg = cfg
        self.hits: dict[str, bool] = {}

    def check(self, stage: str, key: str) -> str:
        """Note whether `stage` will reuse its result for `key`; returns `key`."""
        self.hits[stage] = has_result(self.cfg, stage, key)
        return key

    def all(self, *stages: str) -> bool:
        return all(self.hits[s] for s in stages)

    def unchanged(self) -> bool:
        """Training and evaluation reused (nothing retrained), logged with every stage that was."""
        unchanged = self.hits["train"] and self.hits["evaluate"]
        if unchanged:
            get_run_logger().info(
                "unchanged data: nothing to retrain (training rows, config, base model and code match an earlier run; "
                "reused: %s)",
                ", ".join(stage for stage, hit in self.hits.items() if hit),
            )
        return unchanged


def reuse(folder: Path, cfg: FewtuneConfig, kind: type[Output]) -> Output | None:
    """A complete earlier result of the same stage and key, unless run.refresh_cache asks to recompute."""
    found = None if cfg.run.refresh_cache else load_output(folder, kind)
    if found is not None:
        get_run_logger().info("inputs unchanged: reusing %s", folder)
    return found


def stage(name: str, retries: int = 1) -> Callable:
    """A cached stage. The decorated body takes `(cfg, folder, *inputs)` and returns the stage's record; the task
    takes `(cfg, key, *inputs)`, runs the body in the key's folder unless a complete result is there, and saves it."""
    kind = OUTPUTS[name]

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        found = has_result(parameters["cfg"], name, parameters["key"])
        return f"fewtune-{name}-{parameters['key']}" if found else None

    def decorate(body: Callable[..., StageOutput]):
        def run(cfg: FewtuneConfig, key: str, *inputs: Any, **named: Any) -> StageOutput:
            folder = stage_folder(cfg, name, key)
            if (found := reuse(folder, cfg, kind)) is not None:
                return found
            return save_output(folder, body(cfg, folder, *inputs, **named))

        signature = inspect.signature(body)
        cfg_param, folder_param, *rest = signature.parameters.values()
        params = [cfg_param, folder_param.replace(name="key", annotation=str), *rest]
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return task(name=name, retries=retries, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
                    cache_key_fn=cache_key, persist_result=True)(run)

    return decorate


def artifact_key(cfg: FewtuneConfig) -> str:
    return "".join(c if c.isalnum() else "-" for c in cfg.name.lower())


# ----------------------------------------------------------------------------------------------------------------
# The stages


@stage("validate", retries=0)
def validate_stage(cfg: FewtuneConfig, folder: Path, base_path: str) -> ValidateOutput:
    train = load_records(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    evals = load_records(cfg.data.eval, cfg.data.format, cfg.data.system_prompt) if cfg.data.eval else None
    tokenizer = load_tokenizer(base_path) if cfg.validate_.token_checks else None
    try:
        result = validate_dataset(train, evals, cfg, folder, tokenizer=tokenizer)
    except ValidationFailed as exc:
        validation_artifact(cfg, exc.report_path)
        raise
    probe_path = str(write_jsonl(folder / "probe.jsonl", probe_rows(cfg))) if cfg.data.probe else None
    get_run_logger().info("validate: %s", summary_line(result.summary(), details=True))
    return ValidateOutput(
        train_path=str(result.train_path), eval_path=str(result.eval_path), probe_path=probe_path,
        quarantine_path=str(result.quarantine_path), report_path=str(result.report_path),
        warnings_path=str(result.warnings_path), docs_path=str(result.docs_path.parent) if result.docs_path else None,
        train_hash=content_hash(result.train), eval_hash=content_hash(result.eval), summary=result.summary(),
    )


def probe_rows(cfg: FewtuneConfig) -> list[dict[str, Any]]:
    """The data.probe rows, added to the shipped general-ability probe. They are measured, so none may be dropped
    silently: a row the loader rejects, or an id used twice, stops the run with the row named."""
    probe = load_records(cfg.data.probe, "auto", cfg.data.system_prompt)
    if probe.rejects:
        bad = probe.rejects[0]
        raise DataError(probe.path, f"data.probe: {len(probe.rejects)} row(s) cannot be used; first: {bad.reason}",
                        bad.line, "fix or remove these rows (probe rows are measured, so none is left out silently)")
    seen: dict[str, int] = {}
    for r in probe.records:
        if r["id"] in seen:
            raise DataError(probe.path, f"data.probe: id {r['id']!r} is also used on line {seen[r['id']]}", r["line"],
                            "give every probe row its own id (forgetting results name rows by id)")
        seen[r["id"]] = r["line"]
    return probe.records


def validation_artifact(cfg: FewtuneConfig, report_path: str | Path) -> None:
    """The validate stage's counts per check as a Prefect table artifact (also when the data is not usable)."""
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    files = "; ".join(
        f"{role} `{f['path']}`: {f['rows_in']} in, {f['rows_kept']} kept, {f['rows_quarantined']} quarantined"
        for role, f in report["files"].items()
    )
    status = "usable" if report["usable"] else "**not usable**: " + " ".join(p.splitlines()[0] for p in report["problems"])
    create_table_artifact(check_rows(report), key=f"{artifact_key(cfg)}-validation",
                          description=f"fewtune validation: {status}. {files}")


@stage("score")
def score_stage(cfg: FewtuneConfig, folder: Path, validated: ValidateOutput, base_path: str) -> ScoreOutput:
    result = score_rows(cfg, validated.train_path, base_path, folder / "scores.parquet")
    return scores_output(folder, result, cfg, validated.train_path)


def score_rows(cfg: FewtuneConfig, rows_path: str, base_path: str, out_path: str | Path):
    """Per-example and per-token perplexity of the rows at `rows_path` under the base model (a `ScoreResult`)."""
    model, tokenizer = load_base(base_path, cfg.model.dtype)
    return score_records(read_jsonl(rows_path), model, tokenizer, max_length=cfg.model.max_length,
                         out_path=Path(out_path), **scoring_options(cfg.score))


def scores_output(folder: Path, result, cfg: FewtuneConfig, train_path: str) -> ScoreOutput:
    """STM masks, the outlier action and the score report; its `train_path`: the rows passed on."""
    return ScoreOutput.model_validate(finish_scores(result, read_jsonl(train_path), cfg.score, folder))


@stage("augment", retries=0)
def augment_stage(
    cfg: FewtuneConfig, folder: Path, validated: ValidateOutput, scored: ScoreOutput, base_path: str
) -> AugmentOutput:
    result = augment_rows(cfg, scored.train_path, folder, validated, base_path, scored)  # the rows score passes on
    get_run_logger().info("augment: %s", result.note)
    return augment_output(result)


def augment_rows(cfg: FewtuneConfig, rows_path: str, out_dir: Path, validated: ValidateOutput, base_path: str,
                 scored: ScoreOutput | None, context_path: str | None = None, max_new_rows: int | None = None):
    """augment_records on the rows at `rows_path`: eval rows for the leakage re-check, score outliers to rewrite."""
    return augment_records(
        read_jsonl(rows_path), cfg, Path(out_dir), base_path=base_path, eval_records=read_jsonl(validated.eval_path),
        outlier_ids=(scored.augment_ids if scored else None) or (), scores_path=scored.scores_path if scored else None,
        context_records=read_jsonl(context_path) if context_path else None, max_new_rows=max_new_rows,
    )


def augment_output(result) -> AugmentOutput:
    """The record of an `AugmentResult`."""
    return AugmentOutput(
        train_path=str(result.path), train_hash=content_hash(result.records),
        report_path=str(result.report_path) if result.report_path else None,
        markdown_path=str(result.markdown_path) if result.markdown_path else None,
        rejected_path=str(result.rejected_path) if result.rejected_path else None,
        summary=result.summary(),
    )


def probe_and_replay(cfg: FewtuneConfig, validated: ValidateOutput) -> tuple[list | None, list | None]:
    """The data.probe rows (never trained on: replay that nearly repeats them stops the run) and the data.replay rows
    (None: on-policy replay, the base model's answers to general prompts)."""
    probe = read_jsonl(validated.probe_path) if validated.probe_path else None
    replay = load_records(cfg.data.replay, "auto", cfg.data.system_prompt).records if cfg.data.replay else None
    return probe, replay


@stage("cv")
def cv_stage(cfg: FewtuneConfig, folder: Path, augmented: AugmentOutput, base_path: str, validated: ValidateOutput,
             token_masks: str | None = None) -> CVOutput:
    """k-fold cross-validation (cv.folds > 1): k adapters and their metrics' mean ± spread, before the final adapter."""
    probe, replay = probe_and_replay(cfg, validated)
    result = cross_validate(read_jsonl(augmented.train_path), cfg, base_path, folder, probe=probe, replay=replay,
                            token_masks=token_masks)
    get_run_logger().info("cv: %s", cv_line(result.to_dict()))
    return CVOutput.model_validate(result.to_dict())


@stage("train")
def train_stage(cfg: FewtuneConfig, folder: Path, augmented: AugmentOutput, base_path: str, validated: ValidateOutput,
                init_adapter: str | None = None, token_masks: str | None = None) -> TrainOutput:
    probe, replay = probe_and_replay(cfg, validated)
    run = train_adapter_launched if cfg.train.num_processes > 1 else train_adapter
    result = run(
        read_jsonl(augmented.train_path), cfg, base_path, folder, probe=probe, replay=replay, init_adapter=init_adapter,
        token_masks=token_masks,  # STM masks (score.token_masking), applied in the data collator
    )
    get_run_logger().info(
        "train: %s, best validation loss %s at step %s of %s (%s, %s tokens/s)", result.method, result.best_val_loss,
        result.best_step, result.steps, result.stop_reason, result.tokens_per_s,
    )
    return TrainOutput.model_validate(result.to_dict())


@stage("evaluate")
def evaluate_stage(cfg: FewtuneConfig, folder: Path, validated: ValidateOutput, trained: TrainOutput, base_path: str,
                   train_path: str) -> EvalOutput:
    # Forgetting: the shipped general-ability probe plus the data.probe rows, none of which training saw.
    general = load_general_probe(read_jsonl(validated.probe_path) if validated.probe_path else None)
    result = evaluate_models(
        read_jsonl(validated.eval_path), general, cfg, base_path, trained.adapter_path, folder,
        train_records=read_jsonl(train_path),  # the rows training received: memorization and rephrasing checks
        # the validation slice, held out of training: memorization's control rows
        validation_records=read_jsonl(trained.validation_path) if trained.validation_path else None,
        labels=validated.summary.get("labels") or None,  # labelled data: the label set the rows were shown
        baseline_cache=baseline_cache_for(cfg.run.runs_dir, cfg.evaluate.baseline_cache, cfg.run.refresh_cache,
                                          resolve_base_model(base_path).fingerprint,
                                          cfg.section_hash("model", "evaluate", "score"), stage_code_hash("evaluate")),
    )
    get_run_logger().info("evaluate: %s s (%s)", result.seconds["total"], json.dumps(result.seconds))
    return EvalOutput.model_validate(result.to_dict())


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def register_stage(cfg: FewtuneConfig, run: Run, train_key: str, evaluate_key: str, base: ResolvedModel,
                   validated: ValidateOutput, trained: TrainOutput, evaluated: EvalOutput) -> dict[str, Any]:
    """The promotion gate and the registry: a model version with the run's lineage and files (see `register_model`)."""
    result = register_model(
        cfg, run_name=run.name, adapter_path=trained.adapter_path, base_path=base.path, base_spec=cfg.model.base,
        evaluation=evaluated.model_dump(), lineage=lineage(run, train_key, validated, cfg, base, evaluate_key),
        system_prompt=validated.summary.get("system_prompt", cfg.data.system_prompt),  # with the label list
        eval_records=read_jsonl(validated.eval_path),
        artifacts=registered_files(run.dir),
    )
    return result.to_dict()


@task(name="report", retries=0)
def report_stage(cfg: FewtuneConfig, run_dir: str, summary: dict[str, Any], evaluated: EvalOutput) -> str:
    """report.html in the run folder, attached to the MLflow run, and the same summary as Prefect artifacts."""
    path = write_report(run_dir)
    if summary.get("register"):
        log_artifacts(cfg, summary["register"]["run_id"], [path])
    key, evaluation = artifact_key(cfg), evaluated.model_dump()
    create_markdown_artifact(summary_markdown(summary, evaluation, str(path)), key=f"{key}-summary",
                             description="fewtune run summary and gate")
    create_table_artifact(summary_rows(evaluation), key=f"{key}-metrics",
                          description="baseline vs tuned with bootstrap intervals")
    if summary.get("health"):
        create_markdown_artifact(health_markdown(summary["health"], summary["run_name"]), key=f"{key}-health",
                                 description="fewtune training health: warning signs and what to change")
    get_run_logger().info("report: %s", path)
    return str(path)
