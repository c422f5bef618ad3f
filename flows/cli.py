"""`fewtune` command line.

    fewtune run [--config FILE] [--set key=value ...]   the whole pipeline (default config: the embedded demo)
    fewtune prepare-model [MODEL]                          resolve (and convert, for GGUF) a base model ahead of time

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
    for name, base in ev["baseline"].items():
        tuned = ev["tuned"].get(name)
        delta = tuned - base if isinstance(tuned, (int, float)) and isinstance(base, (int, float)) else None
        label = f"{name} (gate)" if name == ev["primary_metric"] else name
        table.add_row(label, _fmt(base), _fmt(tuned), f"{delta:+.4f}" if delta is not None else "-")
    console.print(table)

    v, t = summary["validate"], summary["train"]
    files = "; ".join(
        f"{role} {f['rows_in']} rows in, {f['rows_kept']} kept, {f['rows_quarantined']} quarantined"
        for role, f in v["files"].items()
    )
    failed = ", ".join(f"{name} {n}" for name, n in v["failed_checks"].items()) or "none"
    console.print(f"data:      {files} (failed checks: {failed})")
    sc = summary["score"]
    console.print(f"score:     base-model answer perplexity {_fmt(sc['response_ppl'])}, {sc['outliers']} outlier rows")
    console.print(f"augment:   {summary['augment']['note']}")
    console.print(
        f"train:     {t['train_rows']} rows (+{t['validation_rows']} held out for early stopping), "
        f"{t['steps']} steps, best validation loss {_fmt(t['best_val_loss'])} at step {t['best_step']}"
        f"{' (stopped early)' if t['stopped_early'] else ''}"
    )
    reg = summary.get("register")
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
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from tasks.models import resolve_base_model

    with console.status(f"preparing {args.model} ..."):
        resolved = resolve_base_model(args.model)
    console.print(f"{args.model}: ready at {resolved.path}")
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
