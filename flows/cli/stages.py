"""Single-stage commands for exploration: `fewtune validate`, `fewtune score`, `fewtune augment`.

Each writes its outputs under `<run.runs_dir>/<name>/` of the current folder unless `--out` says otherwise."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from flows.cli.common import EXIT_USER_ERROR, console, print_user_error


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def print_validation(report: dict[str, Any], paths: dict[str, str]) -> None:
    """Counts per check, files, notes and where the outputs are, from a validation report."""
    table = Table(title="fewtune validate")
    for column in ("check", "severity", "flagged", "quarantined", "warnings"):
        table.add_column(column, justify="left" if column in ("check", "severity") else "right")
    colours = {"fatal": "red", "row error": "yellow", "warning": "cyan"}
    for name, c in report["checks"].items():
        style = colours.get(c["severity"], "") if c["flagged"] else "dim"
        table.add_row(name, c["severity"], str(c["flagged"]), str(c["quarantined"]), str(c["warned"]), style=style)
    console.print(table)
    for role, f in report["files"].items():
        console.print(
            f"{role + ':':12}{escape(str(f['path']))}: {f['rows_in']} rows in, {f['rows_kept']} kept "
            f"({f['kept_as_train']} train, {f['kept_as_eval']} eval), {f['rows_quarantined']} quarantined"
        )
    for warning in report["dataset_warnings"]:
        console.print(f"[cyan]warning:[/cyan]    {escape(str(warning))}")
    for note in report["notes"]:
        console.print(f"note:       {escape(str(note))}")
    for name, path in paths.items():
        console.print(f"{name + ':':12}{escape(str(path))}")


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.common.records import load_records
    from tasks.config import load_config
    from tasks.validate import ValidationFailed, validate_dataset

    cfg = load_config(args.config, args.set)

    def located(spec: str) -> str:
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    cfg.data.train, cfg.data.eval = located(args.data), located(args.eval) if args.eval else None
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / f"validate-{_stamp()}"
    tokenizer = None
    if args.model and cfg.validate_.token_checks:
        from tasks.common.models import load_tokenizer, resolve_base_model

        with console.status(f"loading the tokenizer of {args.model} ..."):
            tokenizer = load_tokenizer(resolve_base_model(args.model).path)
    train = load_records(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    evals = load_records(cfg.data.eval, cfg.data.format, cfg.data.system_prompt) if cfg.data.eval else None
    names = {"train": "train.jsonl", "eval": "eval.jsonl", "quarantine": "quarantine.jsonl",
             "warnings": "warnings.jsonl", "report": "validation.json", "data docs": "data_docs/index.html"}
    paths = {label: str(out / name) for label, name in names.items()}
    try:
        with console.status("validating ..."):
            result = validate_dataset(train, evals, cfg, out, tokenizer=tokenizer)
    except ValidationFailed as exc:
        print_validation(json.loads(exc.report_path.read_text(encoding="utf-8")), paths)
        print_user_error(exc, "not usable")
        return EXIT_USER_ERROR
    print_validation(result.counts, paths)
    console.print(
        f"[green]usable:[/green] {len(result.train)} training rows, {len(result.eval)} eval rows, "
        f"{len(result.quarantined)} quarantined, {result.counts['warned_rows']} rows with warnings, "
        f"{len(result.counts['dataset_warnings'])} dataset warnings"
    )
    return 0


def _readable_rows(path: str, cfg, left_out: str):
    """The rows of `path` that could be read; `DataError` when none could."""
    from tasks.common.records import DataError, load_records

    data = load_records(path, cfg.data.format, cfg.data.system_prompt)
    if not data.records:
        raise DataError(path, "no row could be read", fix="check the file with `fewtune validate DATA`")
    if data.rejects:
        first = data.rejects[0]
        console.print(f"[yellow]{len(data.rejects)} unreadable rows {left_out}[/yellow] "
                      f"(first: line {first.line}: {escape(str(first.reason))})")
    return data.records


def _print_stm(stm: dict[str, Any]) -> None:
    if stm["enabled"]:
        console.print(
            f"STM:       {stm['masked_tokens']} of {stm['answer_tokens']} answer tokens masked "
            f"({100 * stm['masked_fraction']:.1f}%; token perplexity > {stm['threshold']:g}); "
            f"{stm['rows_capped']} rows held back by the guard (max {100 * stm['max_masked_fraction']:.0f}% per answer)"
        )
    else:
        console.print(
            f"STM:       off; threshold {stm['threshold']:g} would mask {100 * stm['would_mask_fraction']:.1f}% of answer "
            "tokens (--set score.token_masking.enabled=true)"
        )


def cmd_score(args: argparse.Namespace) -> int:
    from tasks.common.models import load_base, resolve_base_model
    from tasks.config import load_config
    from tasks.score import finish_scores, score_records, scoring_options

    cfg = load_config(args.config, list(args.set) + ([f"model.base={args.model}"] if args.model else []))
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / (args.name or f"score-{_stamp()}")
    records = _readable_rows(args.data, cfg, "not scored")
    with console.status(f"loading {cfg.model.base} ..."):
        model, tokenizer = load_base(resolve_base_model(cfg.model.base).path, cfg.model.dtype)
    result = score_records(
        records, model, tokenizer, max_length=cfg.model.max_length, out_path=out / "scores.parquet",
        **scoring_options(cfg.score),
    )
    stage = finish_scores(result, records, cfg.score, out)
    sc = stage["summary"]
    console.print(
        f"scored:    {sc['rows']} rows in {sc.get('seconds', 0):.0f} s ({sc.get('tokens_per_s', 0):.0f} tokens/s, "
        f"{str(model.dtype).replace('torch.', '')}) with {escape(cfg.model.base)}"
    )
    console.print(
        f"perplexity: answers {sc['response_ppl']} (median row {sc['median_row_ppl']}), full sequences {sc['sequence_ppl']}"
    )
    console.print(f"outliers:  {escape(str(sc['note']))}")
    if sc["top_outliers"]:
        table = Table(title=f"outliers (robust z of answer log-perplexity > {cfg.score.outlier_z:g})")
        for column in ("id", "answer ppl", "z", "prompt", "answer"):
            table.add_column(column, overflow="fold")
        for o in sc["top_outliers"]:
            table.add_row(*(escape(str(v)) for v in (o["id"], f"{o['ppl']:.1f}", f"{o['log_ppl_z']:.1f}", o["prompt"][:80], o["answer"][:80])))
        console.print(table)
    _print_stm(sc["token_masking"])
    for name in ("scores_path", "train_path", "outliers_path", "report_path", "histogram_path"):
        if stage.get(name):
            console.print(f"{name.replace('_path', '') + ':':11}{escape(str(stage[name]))}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from tasks.augment import augment_records
    from tasks.common.records import load_records
    from tasks.config import load_config

    sets = ["augment.enabled=true", *args.set] + ([f"model.base={args.model}"] if args.model else [])
    cfg = load_config(args.config, sets)
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / (args.name or f"augment-{_stamp()}")
    records = _readable_rows(args.data, cfg, "left out")
    evals = load_records(args.eval, cfg.data.format, cfg.data.system_prompt).records if args.eval else None
    result = augment_records(records, cfg, out, eval_records=evals)
    rep = result.report
    table = Table(title=f"augmentation of {escape(args.data)}")
    for column in ("technique", "planned", "attempted", "generated", "kept", "rejected", "rejected by rule"):
        table.add_column(column, justify="left" if column in ("technique", "rejected by rule") else "right")
    for name, t in (rep.get("techniques") or {}).items():
        rules = ", ".join(f"{k} {v}" for k, v in t["rejected_by_rule"].items()) or "-"
        table.add_row(f"{name} ({t['mode']})", *(str(t[k]) for k in ("rows_planned", "rows_attempted", "generated", "kept", "rejected")), rules)
    console.print(table)
    console.print(f"augment:   {escape(str(result.note))}")
    if not evals:
        console.print("leakage:   not checked (pass --eval EVAL to check augmented rows against held-out rows)")
    for label, path in (("rows", result.path), ("rejected", result.rejected_path), ("report", result.markdown_path)):
        if path:
            console.print(f"{label + ':':11}{escape(str(path))}")
    return 0
