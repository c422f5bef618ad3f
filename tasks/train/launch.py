"""Running the train stage as a program: `python -m tasks.train ...` (this stage alone) and, for several GPUs,
`accelerate launch -m tasks.train ...` (one process per GPU, DDP or FSDP) started by `train_adapter_launched`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.common.models import EncodingError, ModelError
from tasks.common.records import DataError, read_jsonl, write_jsonl
from tasks.config import ConfigError, FewtuneConfig, load_config
from tasks.train.plan import TrainingError
from tasks.train.stage import TrainResult, train_adapter

log = logging.getLogger("fewtune.train")


def launch_command(cfg: FewtuneConfig, args: list[str]) -> list[str]:
    """`accelerate launch` (one process per GPU) running this module with `args`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train.num_processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    return cmd + ["-m", "tasks.train", *args]


def train_adapter_launched(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    base_path: str,
    out_dir: Path,
    *,
    probe: list[dict[str, Any]] | None = None,
    replay: list[dict[str, Any]] | None = None,
    init_adapter: str | None = None,
    token_masks: str | None = None,
) -> TrainResult:
    """`train_adapter` in `train.num_processes` processes under `accelerate launch` (DDP or FSDP)."""
    out_dir = Path(out_dir)
    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "config.json").write_text(json.dumps(cfg.dump()))
    args = ["--config", str(inputs / "config.json"), "--train", str(write_jsonl(inputs / "train.jsonl", records))]
    args += ["--base", base_path, "--out", str(out_dir)]
    if probe:
        args += ["--probe", str(write_jsonl(inputs / "probe.jsonl", probe))]
    if replay:
        args += ["--replay", str(write_jsonl(inputs / "replay.jsonl", replay))]
    if init_adapter:
        args += ["--init-adapter", init_adapter]
    if token_masks:
        args += ["--token-masks", token_masks]
    cmd = launch_command(cfg, args)
    log.info("launching: %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2])
    result_file = out_dir / "train_result.json"
    if done.returncode != 0 or not result_file.is_file():
        raise TrainingError(f"distributed training failed (exit code {done.returncode}); see the output above. Command: {' '.join(cmd)}")
    return TrainResult(**json.loads(result_file.read_text()))


def main(argv: list[str] | None = None) -> int:
    """Run the train stage alone: `python -m tasks.train --config C --train ROWS --base MODEL --out DIR`."""
    p = argparse.ArgumentParser(prog="python -m tasks.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="fewtune config: YAML file, or the JSON a run wrote")
    p.add_argument("--train", required=True, help="training rows (canonical JSONL, e.g. a run's data/train.jsonl)")
    p.add_argument("--base", required=True, help="base model folder (model.base resolved)")
    p.add_argument("--out", required=True, help="output folder (adapter/, checkpoints/, train_result.json)")
    p.add_argument("--probe", help="data.probe rows (JSONL): replay that nearly repeats them stops the run")
    p.add_argument("--replay", help="general-text rows (JSONL) for the replay mix")
    p.add_argument("--init-adapter", help="adapter folder to continue (incremental mode)")
    p.add_argument("--token-masks", help="scores.parquet whose STM token masks apply (score.token_masking)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.config.endswith(".json"):
            cfg = FewtuneConfig.model_validate(json.loads(Path(a.config).read_text()))
        else:
            cfg = load_config(a.config)
        result = train_adapter(
            read_jsonl(a.train),
            cfg,
            a.base,
            Path(a.out),
            probe=read_jsonl(a.probe) if a.probe else None,
            replay=read_jsonl(a.replay) if a.replay else None,
            init_adapter=a.init_adapter,
            token_masks=a.token_masks,
        )
    except (ConfigError, DataError, EncodingError, ModelError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
