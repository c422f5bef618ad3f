"""`fewtune run`: the whole pipeline, then its summary table (metrics, stages, gate, registry, where and how long)."""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from flows.cli.common import console, fmt, print_health


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024**2


def _confidence(ev: dict[str, Any]) -> str:
    return f"{(ev.get('bootstrap') or {}).get('confidence', 0.95) * 100:.0f}%"


STATUS_COLOURS = {"pass": "green", "fail": "red", "error": "red", "insufficient": "yellow", "not_applicable": "dim", "off": "dim"}


def print_gate(gate: dict[str, Any]) -> None:
    """Each gate criterion: status, value with its interval, threshold, rows that would decide it, and the detail."""
    from tasks.report.summary import criterion_cells

    for c in map(criterion_cells, gate.get("criteria", [])):
        colour = STATUS_COLOURS.get(c["status"], "red")
        need = f"  ({c['rows_needed_text']} would decide it)" if c["rows_needed_text"] else ""
        console.print(
            f"  {c['name']:<22} [{colour}]{c['status_text']:<12}[/{colour}] {escape(c['value_text']):<28} "
            f"threshold {escape(c['threshold_text']):<9}{escape(need)}",
            highlight=False,
        )
        console.print(f"  {'':<22} {escape(c['detail'])}", highlight=False, style="dim")


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    ev = summary["evaluate"]
    table = Table(title=f"fewtune run {escape(summary['run_name'])}", show_lines=False)
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
        table.add_row(label, fmt(base), fmt(tuned), f"{delta:+.4f}" if delta is not None else "-", ci)
    console.print(table)
    if ev.get("baselines"):
        b = ev["baselines"]
        for name, row in b["systems"].items():
            d = row["tuned_minus"]
            best = " (best baseline)" if name == b.get("best") else ""
            console.print(f"baseline:  {name}{best} {b['primary_metric']} {row['metrics'][b['primary_metric']]:.4f}; tuned − it "
                          f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]", markup=False, highlight=False)
        console.print(f"worth it?  {ev.get('worth_it')}", markup=False, highlight=False)

    from tasks.validate import summary_line

    v, t = summary["validate"], summary["train"]
    console.print(f"data:      {escape(summary_line(v))}")
    sc = summary["score"]
    console.print(f"score:     base-model answer perplexity {fmt(sc['response_ppl'])}, "
                  f"{escape(sc.get('note') or str(sc['outliers']) + ' outlier rows')}")
    stm = sc.get("token_masking") or {}
    if stm.get("enabled"):
        console.print(f"           STM: {stm['masked_tokens']} of {stm['answer_tokens']} answer tokens masked ({100 * stm['masked_fraction']:.1f}%)")
    console.print(f"augment:   {escape(str(summary['augment']['note']))}")
    console.print(
        f"train:     {t['train_rows']} rows (+{t['validation_rows']} held out for early stopping), "
        f"{t['steps']} steps, best validation loss {fmt(t['best_val_loss'])} at step {t['best_step']}"
        f"{' (stopped early)' if t['stopped_early'] else ''}"
    )
    if summary.get("cv"):
        from flows.cv import cv_line

        console.print(f"cv:        {escape(cv_line(summary['cv']))}", highlight=False)
    print_health(summary.get("health"))
    reg = summary.get("register")
    gate = (reg or {}).get("gate") or summary.get("gate") or {}
    print_gate(gate)
    if reg:
        colour = "green" if reg["promoted"] else "yellow"
        console.print(f"gate:      [{colour}]{escape(reg['decision'])}[/{colour}]", highlight=False)
        console.print(f"registry:  {escape(reg['model_name'])} version {reg['version']} ({', '.join(reg['aliases'])}) "
                      f"at {escape(reg['tracking_uri'])}")
    else:
        if gate.get("decision"):
            console.print(f"gate:      {gate['decision']}", highlight=False, markup=False)
        console.print("registry:  disabled (register.enabled=false): nothing registered")
    console.print(f"run:       {escape(str(summary['run_dir']))}  (summary.json, eval_results.json, predictions.jsonl, adapter/)")
    console.print(f"time:      {seconds:.0f} s, peak memory {_peak_rss_gib():.2f} GiB")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.finetune import finetune
    from tasks.config import load_config
    from tasks.doctor.preflight import preflight

    # a config error, a missing file or package stops here, before Prefect starts a server for the run
    preflight(load_config(args.config, args.set))
    start = time.perf_counter()
    summary = finetune(config_path=args.config, overrides=args.set)
    print_summary(summary, time.perf_counter() - start)
    if summary.get("unchanged"):
        console.print("[green]unchanged data: nothing retrained; the stages reused their cached results[/green]")
    return 0
