"""`fewtune` command line.

    fewtune run [--config FILE] [--set key=value ...]   the whole pipeline (default config: the embedded demo)
    fewtune prepare-model [MODEL]                          resolve (and convert, for GGUF) a base model ahead of time
    fewtune serve [--config FILE] [--set key=value ...]    serve the nightly + dataset-landed deployments
    fewtune webhook [--config FILE] [--host H] [--port P]  the signed data-landing receiver (POST /hooks/dataset-landed)
    fewtune models list | promote VERSION | rollback       the registered model's versions and its champion
    fewtune report RUN_DIR                                 rebuild a run's self-contained report.html
    fewtune validate DATA [--eval DATA] [--model M]        validation only: exit 0 usable, 2 not usable
    fewtune score DATA [--model M] [--out DIR]             perplexity under the base model, outliers, STM masks
    fewtune doctor [--config FILE]                         check torch, GPU, disk, base model, Prefect, MLflow: exit 0 ok, 1 fix
    fewtune health RUN_DIR                                 the training-health checks of a run folder: exit 0 healthy, 1 flags

Errors in data, config or model set-up are printed as one clear message (file, line, fix) with exit code 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

# Prefect reads these at import time.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fewtune")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # `fewtune webhook` logs outside runs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()
EXIT_USER_ERROR = 2


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024**2


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    ev = summary["evaluate"]
    table = Table(title=f"fewtune run {summary['run_name']}", show_lines=False)
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("delta", justify="right")
    intervals = ev.get("intervals") or {}
    table.add_column("95% CI of delta" if not intervals else f"{_confidence(ev)} CI of delta", justify="right")
    for name, base in ev["baseline"].items():
        tuned = ev["tuned"].get(name)
        delta = tuned - base if isinstance(tuned, (int, float)) and isinstance(base, (int, float)) else None
        label = f"{name} (gate)" if name == ev["primary_metric"] else name
        iv = intervals.get(name)
        ci = f"{iv['low']:+.4f} .. {iv['high']:+.4f}" if iv else "-"
        table.add_row(label, _fmt(base), _fmt(tuned), f"{delta:+.4f}" if delta is not None else "-", ci)
    console.print(table)

    from tasks.validate import summary_line

    v, t = summary["validate"], summary["train"]
    console.print(f"data:      {summary_line(v)}")
    sc = summary["score"]
    console.print(f"score:     base-model answer perplexity {_fmt(sc['response_ppl'])}, {sc.get('note') or str(sc['outliers']) + ' outlier rows'}")
    stm = sc.get("token_masking") or {}
    if stm.get("enabled"):
        console.print(f"           STM: {stm['masked_tokens']} of {stm['answer_tokens']} answer tokens masked ({100 * stm['masked_fraction']:.1f}%)")
    console.print(f"augment:   {summary['augment']['note']}")
    console.print(
        f"train:     {t['train_rows']} rows (+{t['validation_rows']} held out for early stopping), "
        f"{t['steps']} steps, best validation loss {_fmt(t['best_val_loss'])} at step {t['best_step']}"
        f"{' (stopped early)' if t['stopped_early'] else ''}"
    )
    if summary.get("cv"):
        from flows.cv import cv_line

        console.print(f"cv:        {cv_line(summary['cv'])}", highlight=False)
    print_health(summary.get("health"))
    reg = summary.get("register")
    gate = (reg or {}).get("gate") or summary.get("gate") or {}
    for c in gate.get("criteria", []):
        mark = "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]"
        console.print(f"  {c['name']:<13} {mark}  {c['detail']}", highlight=False)
    if reg:
        colour = "green" if reg["promoted"] else "yellow"
        console.print(f"gate:      [{colour}]{reg['decision']}[/{colour}]")
        console.print(f"registry:  {reg['model_name']} version {reg['version']} ({', '.join(reg['aliases'])}) at {reg['tracking_uri']}")
    else:
        console.print("registry:  disabled (register.enabled=false)")
    console.print(f"run:       {summary['run_dir']}  (summary.json, eval_results.json, predictions.jsonl, adapter/)")
    console.print(f"time:      {seconds:.0f} s, peak memory {_peak_rss_gib():.2f} GiB")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.finetune import finetune

    start = time.perf_counter()
    summary = finetune(config_path=args.config, overrides=args.set)
    print_summary(summary, time.perf_counter() - start)
    if summary.get("unchanged"):
        console.print("[green]unchanged data: nothing retrained; the stages reused their cached results[/green]")
    return 0


def _confidence(ev: dict[str, Any]) -> str:
    return f"{(ev.get('bootstrap') or {}).get('confidence', 0.95) * 100:.0f}%"


def cmd_models(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks import register

    overrides = list(args.set) + ([f"register.model_name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)
    name = cfg.register_.model_name
    if args.action == "list":
        rows = register.list_versions(cfg)
        if not rows:
            console.print(f"{name} has no versions yet at {register.tracking_uri(cfg)}: `fewtune run` registers one")
            return 0
        table = Table(title=f"{name} at {register.tracking_uri(cfg)}")
        for col in ("version", "aliases", "created (UTC)", "run", "metric", "promoted by gate", "train data", "code"):
            table.add_column(col)
        for r in rows:
            metric = f"{r['primary_metric']} {r['primary_value']}" if r["primary_metric"] else "-"
            table.add_row(r["version"], ", ".join(r["aliases"]), r["created"], r["run_name"], metric, r["promoted"] or "-",
                          r["data_train_hash"], r["code_version"])
        console.print(table)
        history = register.champion_history(register._client(cfg), name)
        if history:
            console.print("champions: " + " -> ".join(f"{h['version']} ({h['how']} {h['at']})" for h in history))
        return 0
    if args.action == "promote":
        if not args.version:
            raise register.RegistryError("usage: fewtune models promote VERSION (see `fewtune models list`)")
        done = register.promote(cfg, args.version)
        console.print(f"{name}: champion is now version {done['version']} (was {done['previous'] or 'none'})")
        if done["gate"] and not done["gate"].startswith("promoted"):
            console.print(f"[yellow]note: its gate said: {done['gate']}[/yellow]")
        return 0
    done = register.rollback(cfg)
    console.print(f"{name}: champion rolled back from version {done['from']} to version {done['to']}")
    return 0


def print_health(report: dict[str, Any] | None) -> None:
    """The training-health verdict, and each warning sign with what to change."""
    if not report:
        return
    from rich.markup import escape

    from tasks.health import health_lines

    first, *rest = health_lines(report)
    colour = "green" if report["healthy"] else "yellow"
    console.print(f"health:    [{colour}]{escape(first)}[/{colour}]", highlight=False)
    for line in rest:
        console.print(f"  {line}", markup=False, highlight=False)


def cmd_health(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from tasks.health import assess_run_dir

    report = assess_run_dir(args.run_dir, count_tokens=True).to_dict()
    table = Table(title=f"training health of {args.run_dir}")
    for column in ("check", "result", "observed", "threshold"):
        table.add_column(column, overflow="fold")
    colours = {"ok": "green", "flag": "yellow", "skipped": "dim"}
    for c in report["checks"]:
        table.add_row(c["title"], f"[{colours[c['status']]}]{c['status']}[/]", escape(c["observed"]), escape(c["threshold"]))
    console.print(table)
    print_health(report)
    return 0 if report["healthy"] else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from tasks.config import load_config
    from tasks.doctor import exit_code, run_checks

    cfg = load_config(args.config, args.set)
    with console.status("checking the environment ..."):
        findings = run_checks(cfg)
    table = Table(title=f"fewtune doctor (config {cfg.name}, base model {cfg.model.base})")
    for column in ("check", "status", "found", "what to do"):
        table.add_column(column, overflow="fold")
    colours = {"ok": "green", "note": "cyan", "fix": "red"}
    for f in findings:
        table.add_row(f.check, f"[{colours[f.status]}]{f.status}[/]", escape(f.detail), escape(f.fix))
    console.print(table)
    to_fix = [f.check for f in findings if f.status == "fix"]
    console.print(f"[red]to fix: {', '.join(to_fix)}[/red]" if to_fix else "[green]nothing to fix[/green]")
    return exit_code(findings)


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.report import write_report

    path = write_report(args.run_dir)
    console.print(f"report: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve

    serve(args.config, args.set)
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from deployments.webhook import serve_webhook
    from tasks.config import load_config

    serve_webhook(load_config(args.config, args.set), host=args.host, port=args.port)
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from tasks.common.models import resolve_base_model

    with console.status(f"preparing {args.model} ..."):
        resolved = resolve_base_model(args.model)
    console.print(f"{args.model}: ready at {resolved.path}")
    return 0


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
            f"{role + ':':12}{f['path']}: {f['rows_in']} rows in, {f['rows_kept']} kept "
            f"({f['kept_as_train']} train, {f['kept_as_eval']} eval), {f['rows_quarantined']} quarantined"
        )
    for warning in report["dataset_warnings"]:
        console.print(f"[cyan]warning:[/cyan]    {warning}")
    for note in report["notes"]:
        console.print(f"note:       {note}")
    for name, path in paths.items():
        console.print(f"{name + ':':12}{path}")


def cmd_validate(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    from tasks.config import load_config
    from tasks.common.records import load_records
    from tasks.validate import ValidationFailed, validate_dataset

    cfg = load_config(args.config, args.set)

    def located(spec: str) -> str:
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    cfg.data.train, cfg.data.eval = located(args.data), located(args.eval) if args.eval else None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / f"validate-{stamp}"
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
        console.print(f"[bold red]not usable:[/bold red] {exc}")
        return EXIT_USER_ERROR
    print_validation(result.counts, paths)
    console.print(
        f"[green]usable:[/green] {len(result.train)} training rows, {len(result.eval)} eval rows, "
        f"{len(result.quarantined)} quarantined, {result.counts['warned_rows']} rows with warnings, "
        f"{len(result.counts['dataset_warnings'])} dataset warnings"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone
    from pathlib import Path

    from tasks.config import load_config
    from tasks.common.records import DataError, load_records
    from tasks.common.models import load_model, load_tokenizer, pick_dtype, resolve_base_model
    from tasks.score import finish_scores, score_records, scoring_options

    cfg = load_config(args.config, list(args.set) + ([f"model.base={args.model}"] if args.model else []))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / (args.name or f"score-{stamp}")
    data = load_records(args.data, cfg.data.format, cfg.data.system_prompt)
    if not data.records:
        raise DataError(args.data, "no row could be read", fix="check the file with `fewtune validate DATA`")
    if data.rejects:
        first = data.rejects[0]
        console.print(f"[yellow]{len(data.rejects)} unreadable rows not scored[/yellow] (first: line {first.line}: {first.reason})")
    with console.status(f"loading {cfg.model.base} ..."):
        base = resolve_base_model(cfg.model.base)
        tokenizer = load_tokenizer(base.path)
        model = load_model(base.path, dtype=pick_dtype(cfg.model.dtype))
    result = score_records(
        data.records, model, tokenizer, max_length=cfg.model.max_length, out_path=out / "scores.parquet",
        **scoring_options(cfg.score),
    )
    stage = finish_scores(result, data.records, cfg.score, out)
    sc = stage["summary"]
    console.print(
        f"scored:    {sc['rows']} rows in {sc.get('seconds', 0):.0f} s ({sc.get('tokens_per_s', 0):.0f} tokens/s, "
        f"{str(model.dtype).replace('torch.', '')}) with {cfg.model.base}"
    )
    console.print(
        f"perplexity: answers {sc['response_ppl']} (median row {sc['median_row_ppl']}), full sequences {sc['sequence_ppl']}"
    )
    console.print(f"outliers:  {sc['note']}")
    if sc["top_outliers"]:
        table = Table(title=f"outliers (robust z of answer log-perplexity > {cfg.score.outlier_z:g})")
        for column in ("id", "answer ppl", "z", "prompt", "answer"):
            table.add_column(column, overflow="fold")
        for o in sc["top_outliers"]:
            table.add_row(str(o["id"]), f"{o['ppl']:.1f}", f"{o['log_ppl_z']:.1f}", o["prompt"][:80], o["answer"][:80])
        console.print(table)
    stm = sc["token_masking"]
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
    for name in ("scores_path", "train_path", "outliers_path", "report_path", "histogram_path"):
        if stage.get(name):
            console.print(f"{name.replace('_path', '') + ':':11}{stage[name]}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone
    from pathlib import Path

    from tasks.config import load_config
    from tasks.augment import augment_records
    from tasks.common.records import DataError, load_records

    sets = ["augment.enabled=true", *args.set] + ([f"model.base={args.model}"] if args.model else [])
    cfg = load_config(args.config, sets)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / (args.name or f"augment-{stamp}")
    data = load_records(args.data, cfg.data.format, cfg.data.system_prompt)
    if not data.records:
        raise DataError(args.data, "no row could be read", fix="check the file with `fewtune validate DATA`")
    if data.rejects:
        first = data.rejects[0]
        console.print(f"[yellow]{len(data.rejects)} unreadable rows left out[/yellow] (first: line {first.line}: {first.reason})")
    evals = load_records(args.eval, cfg.data.format, cfg.data.system_prompt).records if args.eval else None
    result = augment_records(data.records, cfg, out, eval_records=evals)
    rep = result.report
    table = Table(title=f"augmentation of {args.data}")
    for column in ("technique", "planned", "attempted", "generated", "kept", "rejected", "rejected by rule"):
        table.add_column(column, justify="left" if column in ("technique", "rejected by rule") else "right")
    for name, t in (rep.get("techniques") or {}).items():
        rules = ", ".join(f"{k} {v}" for k, v in t["rejected_by_rule"].items()) or "-"
        table.add_row(f"{name} ({t['mode']})", *(str(t[k]) for k in ("rows_planned", "rows_attempted", "generated", "kept", "rejected")), rules)
    console.print(table)
    console.print(f"augment:   {result.note}")
    if not evals:
        console.print("leakage:   not checked (pass --eval EVAL to check augmented rows against held-out rows)")
    for label, path in (("rows", result.path), ("rejected", result.rejected_path), ("report", result.markdown_path)):
        if path:
            console.print(f"{label + ':':11}{path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewtune", description="Safe, repeatable fine-tuning on small datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline: validate, score, augment, train, evaluate, register")
    run.add_argument("--config", help="YAML config (default: the embedded demo, configs/demo.yaml)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. train.epochs=2"
    )
    run.set_defaults(func=cmd_run)
    prep = sub.add_parser("prepare-model", help="resolve/convert a base model once (the demo's is embedded)")
    prep.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    prep.set_defaults(func=cmd_prepare_model)
    serve = sub.add_parser("serve", help="serve the nightly schedule and the dataset-landed trigger (needs PREFECT_API_URL)")
    serve.add_argument("--config", help="YAML config the runs use (default: the embedded demo)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    serve.set_defaults(func=cmd_serve)
    hook = sub.add_parser("webhook", help="signed receiver: POST /hooks/dataset-landed emits fewtune.dataset.landed")
    hook.add_argument("--config", help="YAML config holding the webhook and serve sections")
    hook.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    hook.add_argument("--host", help="listen address (default: webhook.host)")
    hook.add_argument("--port", type=int, help="listen port (default: webhook.port)")
    hook.set_defaults(func=cmd_webhook)
    models = sub.add_parser("models", help="registry: list versions, promote a version to champion, roll back")
    models.add_argument("action", choices=["list", "promote", "rollback"])
    models.add_argument("version", nargs="?", help="promote: the version to make champion")
    models.add_argument("--config", help="YAML config naming the model and tracking URI (default: the embedded demo)")
    models.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    models.add_argument("--name", help="registered model name (default: register.model_name of the config)")
    models.set_defaults(func=cmd_models)
    val = sub.add_parser(
        "validate", help="validate a dataset only: counts per check, quarantine and Data Docs; exit 0 usable, 2 not"
    )
    val.add_argument("data", help="training data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    val.add_argument("--eval", help="held-out eval data (default: a split of DATA, as in a run)")
    val.add_argument("--model", help="base model whose tokenizer checks token lengths (default: skip those checks)")
    val.add_argument("--config", help="YAML config for the thresholds (default: the embedded demo)")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    val.add_argument("--out", help="output folder (default: <run.runs_dir>/validate-<UTC timestamp>)")
    val.set_defaults(func=cmd_validate)
    score = sub.add_parser("score", help="score a dataset under the base model: perplexity, outliers, STM masks")
    score.add_argument("data", help="data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    score.add_argument("--model", help="base model (default: model.base of the config, the embedded SmolLM2)")
    score.add_argument("--config", help="YAML config for the score settings (default: the embedded demo)")
    score.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    score.add_argument("--name", help="output folder name under run.runs_dir (default: score-<UTC timestamp>)")
    score.add_argument("--out", help="output folder (default: <run.runs_dir>/<name>)")
    score.set_defaults(func=cmd_score)
    aug = sub.add_parser("augment", help="augment a dataset: self-distillation and paraphrases behind the equivalence filter")
    aug.add_argument("data", help="training data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    aug.add_argument("--eval", help="held-out rows that augmented rows must not repeat (leakage re-check)")
    aug.add_argument("--model", help="base model (default: model.base of the config, the embedded SmolLM2)")
    aug.add_argument("--config", help="YAML config for the augment settings (default: the embedded demo)")
    aug.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    aug.add_argument("--name", help="output folder name under run.runs_dir (default: augment-<UTC timestamp>)")
    aug.add_argument("--out", help="output folder (default: <run.runs_dir>/<name>)")
    aug.set_defaults(func=cmd_augment)
    report = sub.add_parser("report", help="rebuild a run folder's self-contained report.html")
    report.add_argument("run_dir", help="a run folder, e.g. runs/demo-20261123-101500")
    report.set_defaults(func=cmd_report)
    doctor = sub.add_parser("doctor", help="check the environment (torch, GPU, bitsandbytes, disk, base model, Prefect, MLflow)")
    doctor.add_argument("--config", help="YAML config whose base model, runs folder and tracking URI are checked (default: the demo)")
    doctor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    doctor.set_defaults(func=cmd_doctor)
    health = sub.add_parser("health", help="training-health checks of a finished run folder, with what to change")
    health.add_argument("run_dir", help="a run folder, e.g. runs/demo-20261123-101500")
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.finetune import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; re-run the same command to resume from the last completed stage[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
