"""`fewtune` command line.

    fewtune run [--config FILE] [--set key=value ...]   the whole pipeline (default config: the embedded demo)
    fewtune prepare-model [MODEL]                          resolve (and convert, for GGUF) a base model ahead of time
    fewtune serve [--config FILE] [--set key=value ...]    serve the nightly + dataset-landed deployments
    fewtune webhook [--config FILE] [--host H] [--port P]  the signed data-landing receiver (POST /hooks/dataset-landed)
    fewtune models list | promote VERSION | rollback       the registered model's versions and its champion
    fewtune export SOURCE --format peft|merged|gguf        a run folder or registered version, ready to deploy
    fewtune report RUN_DIR                                 rebuild a run's self-contained report.html
    fewtune validate DATA [--eval DATA] [--model M]        validation only: exit 0 usable, 2 not usable
    fewtune score DATA [--model M] [--out DIR]             perplexity under the base model, outliers, STM masks
    fewtune doctor [--config FILE]                         check torch, GPU, disk, base model, Prefect, MLflow: exit 0 ok, 1 fix
    fewtune health RUN_DIR                                 the training-health checks of a run folder: exit 0 healthy, 1 flags

Errors in data, config or model set-up are printed as one clear message (file, line, fix) with exit code 2;
never a traceback. Running out of memory (after training's automatic retries with a smaller micro-batch) is one
message too, with exit code 3.

The commands live by concern: `run` (the pipeline and its summary), `stages` (validate, score, augment),
`registry` (models), `ops` (serve, webhook, doctor, report, health, prepare-model). Stage and library imports stay
inside the commands, so `fewtune --help` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os

# Prefect reads these at import time.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fewtune")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # `fewtune webhook` logs outside runs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A first run creates Prefect's database (migrations take ~20 s on a 2-core machine, Prefect's default wait for its
# temporary server): wait longer rather than fail a new user's first `fewtune run`.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from flows.cli.common import EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, console, print_health, print_user_error  # noqa: E402
from flows.cli.export import add_export_parser  # noqa: E402
from flows.cli.ops import cmd_doctor, cmd_health, cmd_prepare_model, cmd_report, cmd_serve, cmd_webhook  # noqa: E402
from flows.cli.registry import cmd_models  # noqa: E402
from flows.cli.run import cmd_run, print_summary  # noqa: E402
from flows.cli.stages import cmd_augment, cmd_score, cmd_validate, print_validation  # noqa: E402

__all__ = [
    "EXIT_USER_ERROR",
    "build_parser",
    "cmd_augment",
    "cmd_doctor",
    "cmd_health",
    "cmd_models",
    "cmd_prepare_model",
    "cmd_report",
    "cmd_run",
    "cmd_score",
    "cmd_serve",
    "cmd_validate",
    "cmd_webhook",
    "console",
    "main",
    "print_health",
    "print_summary",
    "print_user_error",
    "print_validation",
]


def _add_set(parser: argparse.ArgumentParser, text: str = "override a config field") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewtune", description="Safe, repeatable fine-tuning on small datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline: validate, score, augment, train, evaluate, register")
    run.add_argument("--config", help="YAML config (default: the embedded demo, configs/demo.yaml)")
    _add_set(run, "override a config field, e.g. train.epochs=2")
    run.set_defaults(func=cmd_run)
    prep = sub.add_parser("prepare-model", help="resolve/convert a base model once (the demo's is embedded)")
    prep.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    prep.set_defaults(func=cmd_prepare_model)
    serve = sub.add_parser("serve", help="serve the nightly schedule and the dataset-landed trigger (needs PREFECT_API_URL)")
    serve.add_argument("--config", help="YAML config the runs use (default: the embedded demo)")
    _add_set(serve)
    serve.set_defaults(func=cmd_serve)
    hook = sub.add_parser("webhook", help="signed receiver: POST /hooks/dataset-landed emits fewtune.dataset.landed")
    hook.add_argument("--config", help="YAML config holding the webhook and serve sections")
    _add_set(hook)
    hook.add_argument("--host", help="listen address (default: webhook.host)")
    hook.add_argument("--port", type=int, help="listen port (default: webhook.port)")
    hook.set_defaults(func=cmd_webhook)
    models = sub.add_parser("models", help="registry: list versions, promote a version to champion, roll back")
    models.add_argument("action", choices=["list", "promote", "rollback"])
    models.add_argument("version", nargs="?", help="promote: the version to make champion")
    models.add_argument("--config", help="YAML config naming the model and tracking URI (default: the embedded demo)")
    _add_set(models)
    models.add_argument("--name", help="registered model name (default: register.model_name of the config)")
    models.set_defaults(func=cmd_models)
    add_export_parser(sub)
    val = sub.add_parser(
        "validate", help="validate a dataset only: counts per check, quarantine and Data Docs; exit 0 usable, 2 not"
    )
    val.add_argument("data", help="training data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    val.add_argument("--eval", help="held-out eval data (default: a split of DATA, as in a run)")
    val.add_argument("--model", help="base model whose tokenizer checks token lengths (default: skip those checks)")
    val.add_argument("--config", help="YAML config for the thresholds (default: the embedded demo)")
    _add_set(val)
    val.add_argument("--out", help="output folder (default: <run.runs_dir>/validate-<UTC timestamp>)")
    val.set_defaults(func=cmd_validate)
    score = sub.add_parser("score", help="score a dataset under the base model: perplexity, outliers, STM masks")
    score.add_argument("data", help="data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    score.add_argument("--model", help="base model (default: model.base of the config, the embedded SmolLM2)")
    score.add_argument("--config", help="YAML config for the score settings (default: the embedded demo)")
    _add_set(score)
    score.add_argument("--name", help="output folder name under run.runs_dir (default: score-<UTC timestamp>)")
    score.add_argument("--out", help="output folder (default: <run.runs_dir>/<name>)")
    score.set_defaults(func=cmd_score)
    aug = sub.add_parser("augment", help="augment a dataset: self-distillation and paraphrases behind the equivalence filter")
    aug.add_argument("data", help="training data: .jsonl/.json/.csv/.parquet file, save_to_disk folder or hub id")
    aug.add_argument("--eval", help="held-out rows that augmented rows must not repeat (leakage re-check)")
    aug.add_argument("--model", help="base model (default: model.base of the config, the embedded SmolLM2)")
    aug.add_argument("--config", help="YAML config for the augment settings (default: the embedded demo)")
    _add_set(aug)
    aug.add_argument("--name", help="output folder name under run.runs_dir (default: augment-<UTC timestamp>)")
    aug.add_argument("--out", help="output folder (default: <run.runs_dir>/<name>)")
    aug.set_defaults(func=cmd_augment)
    report = sub.add_parser("report", help="rebuild a run folder's self-contained report.html")
    report.add_argument("run_dir", help="a run folder, e.g. runs/demo-20261123-101500")
    report.set_defaults(func=cmd_report)
    doctor = sub.add_parser("doctor", help="check the environment (torch, GPU, bitsandbytes, disk, base model, Prefect, MLflow)")
    doctor.add_argument("--config", help="YAML config whose base model, runs folder and tracking URI are checked (default: the demo)")
    _add_set(doctor)
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
        print_user_error(exc)
        return EXIT_USER_ERROR
    except MemoryError as exc:  # loading or training did not fit even after the automatic retries
        print_user_error(exc if str(exc) else "the run needed more memory than this machine has; lower model.max_length "
                         "or train.batch_size, or set model.dtype bfloat16", "out of memory")
        return EXIT_OUT_OF_MEMORY
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; re-run the same command to resume from the last completed stage[/yellow]")
        return 130

