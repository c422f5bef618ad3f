"""Operations commands: `fewtune serve`, `webhook`, `doctor`, `report`, `health` and `prepare-model`."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from flows.cli.common import console, print_health


def cmd_health(args: argparse.Namespace) -> int:
    from tasks.health import assess_run_dir

    report = assess_run_dir(args.run_dir, count_tokens=True).to_dict()
    table = Table(title=f"training health of {escape(args.run_dir)}")
    for column in ("check", "result", "observed", "threshold"):
        table.add_column(column, overflow="fold")
    colours = {"ok": "green", "flag": "yellow", "skipped": "dim"}
    for c in report["checks"]:
        table.add_row(c["title"], f"[{colours[c['status']]}]{c['status']}[/]", escape(c["observed"]), escape(c["threshold"]))
    console.print(table)
    print_health(report)
    return 0 if report["healthy"] else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.doctor import exit_code, run_checks

    cfg = load_config(args.config, args.set)
    with console.status("checking the environment ..."):
        findings = run_checks(cfg)
    table = Table(title=f"fewtune doctor (config {escape(cfg.name)}, base model {escape(cfg.model.base)})")
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
    console.print(f"report: {escape(str(path))}")
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

    with console.status(f"preparing {escape(args.model)} ..."):
        resolved = resolve_base_model(args.model)
    console.print(f"{escape(args.model)}: ready at {escape(resolved.path)}")
    return 0
