"""The health checks over what a run left behind: a train stage folder, or a whole run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.health_checks import HealthReport, assess
from tasks.common.health_run import assess_run_folder, read_json, run_config
from tasks.common.models import encode_chat, load_tokenizer, resolve_base_model
from tasks.common.records import read_jsonl, training_split
from tasks.config import FewtuneConfig


def assess_train_dir(train_dir: str | Path, evaluation: dict[str, Any] | None, cfg: FewtuneConfig) -> HealthReport:
    """`assess` over a train stage folder (train_log.json, train_result.json, train_plan.json)."""
    folder = Path(train_dir)
    return assess(read_json(folder / "train_log.json") or [], evaluation, cfg,
                  read_json(folder / "train_result.json"), read_json(folder / "train_plan.json"))


def count_loss_tokens(records: list[dict[str, Any]], cfg: FewtuneConfig, base_path: str) -> int:
    """Answer tokens that carry loss in the rows training learns from (the validation slice held out, as the train
    stage does; before STM masks)."""
    tokenizer = load_tokenizer(base_path)
    trained, _ = training_split(records, cfg.train.validation_fraction, cfg.train.seed)
    return sum(sum(1 for x in encode_chat(tokenizer, r, cfg.model.max_length)["labels"] if x != -100) for r in trained)


def assess_run_dir(run_dir: str | Path, count_tokens: bool = False) -> HealthReport:
    """Every check over a run folder made by `fewtune run`; thresholds from its config.yaml. `count_tokens`: count the
    trainable tokens from its training rows when the run did not record them (loads the base model's tokenizer)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    result = read_json(run_dir / "train_result.json") or {}
    if count_tokens and result.get("loss_tokens") is None:
        rows = run_dir / "data" / ("augmented.jsonl" if (run_dir / "data" / "augmented.jsonl").is_file() else "train.jsonl")
        if rows.is_file():
            result["loss_tokens"] = count_loss_tokens(read_jsonl(rows), cfg, resolve_base_model(cfg.model.base).path)
    return assess_run_folder(run_dir, cfg, result)
