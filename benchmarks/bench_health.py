"""What do the training-health checks cost, next to the training they watch? Measured here, no model loaded.

    python benchmarks/bench_health.py [RUN_DIR] [--evals 200] [--repeat 20]

1. `assess` over a finished run folder (default: the newest `runs/demo-*`): the five checks read from train_log.json,
   train_result.json and eval_results.json, as the flow runs them after evaluation.
2. The live callback's work at one evaluation: the training-log checks over a log history of `--evals` evaluations
   (the demo's log repeated; a long run's history, since the checks read the whole log each time).

Baseline, from the same run folder: the time of one optimizer step of that run (train_result.json: seconds / steps),
which is what the live check is paid against at every evaluation. Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> int:
    from tasks.common.health_checks import check_convergence, check_loss_gap
    from tasks.config import FewtuneConfig
    from tasks.health import assess_run_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a run folder (default: the newest runs/demo-*)")
    parser.add_argument("--evals", type=int, default=200, help="evaluations in the long log history")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    runs = sorted((REPO / "runs").glob("demo-*"), key=lambda p: p.stat().st_mtime)
    run_dir = Path(args.run_dir) if args.run_dir else (runs[-1] if runs else None)
    if run_dir is None or not (run_dir / "train_log.json").is_file():
        print("no run folder with train_log.json: run `fewtune run` first or pass RUN_DIR", file=sys.stderr)
        return 2
    result = json.loads((run_dir / "train_result.json").read_text())
    step_s = result["seconds"] / max(1, result["steps"])
    log = [e for e in json.loads((run_dir / "train_log.json").read_text()) if "step" in e and ("loss" in e or "eval_loss" in e)]
    evals_per_log = sum("eval_loss" in e for e in log)
    last = max(e["step"] for e in log)
    long_log = [
        {**e, "step": e["step"] + i * last} for i in range(max(1, args.evals // max(1, evals_per_log))) for e in log
    ]
    h = FewtuneConfig(data={"train": "-"}).health

    assess_s = timed(lambda: assess_run_dir(run_dir), args.repeat)
    live_s = timed(lambda: (check_convergence(long_log, h), check_loss_gap(long_log, h)), args.repeat)
    print(f"run: {run_dir.name}: {result['steps']} steps in {result['seconds']} s ({step_s:.2f} s per optimizer step)")
    print(f"assess (all five checks, after evaluation): {assess_s * 1000:.1f} ms")
    print(f"live checks at one evaluation, {sum('eval_loss' in e for e in long_log)} evaluations in the log: {live_s * 1000:.2f} ms")
    print(f"ratio live check / one optimizer step: {live_s / step_s:.2e}")
    print(f"ratio assess / the run's training time: {assess_s / result['seconds']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
