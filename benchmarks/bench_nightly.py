"""The nightly deployment on unchanged data versus its first run, through a real Prefect server.

    .venv/bin/python benchmarks/bench_nightly.py [--config configs/demo.yaml] [--set key=value ...]

Starts `prefect server start` on 127.0.0.1 and `fewtune serve` (both stopped at the end, by pid), then runs
`prefect deployment run 'finetune/nightly'` twice on the same config and data. Prints each run's duration as the
server records it (flow-run start to end) and as an operator sees it (from the CLI call to the final state, which
adds the runner's polling and the run's process start), and the unchanged run's share of the first. The base model
is read from the user's FEWTUNE_HOME (converted once by `make setup`); runs, caches and the model registry of this
benchmark live in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from prefect_server import Api, LocalPrefectServer, start_process, stop_process, wait_until  # noqa: E402


def _duration_s(run: dict) -> float:
    return (datetime.fromisoformat(run["end_time"]) - datetime.fromisoformat(run["start_time"])).total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="fewtune-bench-nightly-"))
    user_home = Path(os.environ.get("FEWTUNE_HOME", Path.home() / ".cache" / "fewtune"))
    home = work / "home"
    home.mkdir()
    (home / "models").symlink_to(user_home / "models")  # the converted base model, read-only here
    server = LocalPrefectServer(work / "prefect").start()
    env = server.env(FEWTUNE_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    serve_args = [sys.executable, "-m", "flows.cli", "serve", "--config", str(Path(args.config).resolve())]
    for item in args.set:
        serve_args += ["--set", item]
    serve = start_process(serve_args, env, work / "serve.log", cwd=work)
    api = Api(server.url)
    try:
        wait_until(lambda: api.deployment("finetune/nightly"), 300, "fewtune serve to register its deployments")
        results = []
        for label in ("first run", "unchanged run"):
            t0 = time.perf_counter()
            done = subprocess.run(
                [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "finetune/nightly"],
                env=env, capture_output=True, text=True, check=True,
            )
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
            run = api.wait_for_final(run_id, args.timeout)
            wall = time.perf_counter() - t0
            if run["state_type"] != "COMPLETED":
                print((work / "serve.log").read_text()[-4000:])
                raise SystemExit(f"{label}: {run['state_type']}")
            unchanged = any(line.startswith("unchanged data") for line in api.logs(run_id))
            results.append((label, _duration_s(run), wall, unchanged))
        for label, seconds, wall, unchanged in results:
            print(f"{label:14s} flow run {seconds:7.1f} s   CLI call to final state {wall:7.1f} s   "
                  f"'unchanged data' logged: {unchanged}")
        (_, first, first_wall, _), (_, second, second_wall, _) = results
        print(f"unchanged / first: {second / first:.1%} of the flow-run time, {second_wall / first_wall:.1%} of the wall time")
    finally:
        stop_process(serve)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
