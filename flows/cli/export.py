"""`fewtune export SOURCE --format peft|merged|gguf`: a run folder or a registered version, in the form a deployment
loads (see docs/serving.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from flows.cli.common import console


def add_export_parser(sub) -> None:
    exp = sub.add_parser("export", help="export a tuned model: the adapter (peft), merged weights, or GGUF for llama.cpp/Ollama")
    exp.add_argument("source", help="a run folder (runs/<run-name>) or a registry reference: models:/NAME@champion, "
                     "models:/NAME/3, NAME/3")
    exp.add_argument("--format", default="merged", choices=["peft", "merged", "gguf"],
                     help="peft: the adapter with a portable base reference; merged: one transformers folder; "
                     "gguf: f16 and q8_0 files plus an Ollama Modelfile (default: merged)")
    exp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="merged weights' dtype (default: bfloat16)")
    exp.add_argument("--gguf-types", default="f16,q8_0", help="GGUF files to write (default: f16,q8_0)")
    exp.add_argument("--out", help="output folder, new or empty (default: exports/<source name>-<format>)")
    exp.add_argument("--config", help="YAML config naming the tracking URI of a registry reference (default: the demo)")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    exp.set_defaults(func=cmd_export)


def default_out(source: str, fmt: str) -> Path:
    name = Path(source).name if Path(source).expanduser().is_dir() else source.removeprefix("models:/")
    return Path("exports") / f"{''.join(c if c.isalnum() or c in '-_.' else '-' for c in name)}-{fmt}"


def cmd_export(args: argparse.Namespace) -> int:
    from tasks.common.registry import tracking_uri
    from tasks.config import load_config
    from tasks.export import export_model

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else default_out(args.source, args.format)
    types = tuple(t.strip() for t in args.gguf_types.split(",") if t.strip())
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total)
            bars.update(tasks[step], completed=done, total=total)

        result = export_model(args.source, args.format, out, dtype=args.dtype, gguf_types=types,
                              tracking_uri=tracking_uri(cfg), progress=progress)
    total = sum(result.files.values())
    console.print(f"exported {escape(args.source)} as {result.format} to {escape(result.out_dir)} "
                  f"({total / 2**20:.1f} MiB, {result.seconds:.1f} s)", highlight=False, soft_wrap=True)
    for name, size in result.files.items():
        console.print(f"  {escape(name):<40} {size / 2**20:9.2f} MiB", highlight=False, soft_wrap=True)
    if result.base:
        ref = result.base
        console.print(f"base: {escape(str(ref.get('hub_id') or ref.get('spec') or ref.get('name')))}"
                      + (f" (weights fingerprint {ref['fingerprint']})" if ref.get("fingerprint") else ""), highlight=False, soft_wrap=True)
    return 0
