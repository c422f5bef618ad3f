"""`fewtune models list | promote VERSION | rollback`: the registered model's versions and its champion."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from flows.cli.common import console


def gate_cell(criteria: dict[str, str]) -> str:
    """The criteria of a version's gate that did not pass, with their status (`gate.<criterion>` tags)."""
    from tasks.report.summary import STATUS_LABELS

    bad = [f"{name} {STATUS_LABELS.get(status, status)}" for name, status in criteria.items()
           if status not in ("pass", "not_applicable", "off")]
    return ", ".join(bad) if bad else ("none" if criteria else "-")


def served_line(name: str, rows: list[dict]) -> str:
    """What `mlflow models serve -m models:/NAME@champion` serves when it starts now, and how to make it follow."""
    champion = next((r for r in rows if "champion" in r["aliases"]), None)
    if champion is None:
        return (f"served: nothing yet: models:/{name}@champion names no version (a run whose gate passes sets it; "
                "or `fewtune models promote VERSION`)")
    return (f"served: models:/{name}@champion -> version {champion['version']} ({champion['run_name']}). A server "
            "resolves the alias when it starts: restart it after a promote or rollback (docs/serving.md)")


def cmd_models(args: argparse.Namespace) -> int:
    from tasks import register
    from tasks.common.registry import RegistryError, tracking_uri
    from tasks.config import load_config

    overrides = list(args.set) + ([f"register.model_name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)
    name = cfg.register_.model_name
    if args.action == "list":
        rows = register.list_versions(cfg)
        if not rows:
            console.print(f"{escape(name)} has no versions yet at {escape(tracking_uri(cfg))}: `fewtune run` registers one")
            return 0
        table = Table(title=f"{escape(name)} at {escape(tracking_uri(cfg))}")
        for col in ("version", "aliases", "created (UTC)", "run", "metric", "promoted by gate", "criteria not passed",
                    "train data", "code"):
            table.add_column(col)
        for r in rows:
            metric = f"{r['primary_metric']} {r['primary_value']}" if r["primary_metric"] else "-"
            cells = (r["version"], ", ".join(r["aliases"]), r["created"], r["run_name"], metric, r["promoted"] or "-",
                     gate_cell(r.get("criteria") or {}), r["data_train_hash"], r["code_version"])
            table.add_row(*(escape(str(c)) for c in cells))
        console.print(table)
        console.print(escape(served_line(name, rows)))
        history = register.champion_history(register._client(cfg), name)
        if history:
            console.print("champions: " + " -> ".join(f"{h['version']} ({h['how']} {h['at']})" for h in history))
        return 0
    if args.action == "promote":
        if not args.version:
            raise RegistryError("usage: fewtune models promote VERSION (see `fewtune models list`)")
        done = register.promote(cfg, args.version)
        console.print(f"{escape(name)}: champion is now version {done['version']} (was {done['previous'] or 'none'}); "
                      f"restart servers of models:/{escape(name)}@champion to serve it")
        if done["gate"] and not done["gate"].startswith("promoted"):
            console.print(f"[yellow]note: its gate said: {escape(done['gate'])}[/yellow]")
        return 0
    done = register.rollback(cfg)
    console.print(f"{escape(name)}: champion rolled back from version {done['from']} to version {done['to']}; "
                  f"restart servers of models:/{escape(name)}@champion to serve it")
    return 0
