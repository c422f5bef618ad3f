"""Does the cost of validate + score grow with the rows and nothing more? And does Dask pay off on one machine?

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--dask-rows 10000] [--workers 2] [--model PATH]

1. For each size: synthetic support rows (bench_validate's generator: near-copies, exact copies, eval leaks, personal
   data) through the validate stage as a run does it (near-duplicate and leakage search on, token-length checks with
   the model's tokenizer), then the score stage's own function (`flows.stages.score_rows`: load the model, score every
   kept row, write the parquet). Prints the seconds of each and the growth factor from one size to the next: with
   linear cost, 10x the rows costs about 10x.
2. At `--dask-rows`: the same scoring cut into `--workers` shards on a Dask `LocalCluster` of process workers (one
   thread each), merged by the score stage's own merge (what `run.task_runner: dask` does), against one process
   scoring all rows with torch's threads. Prints the ratio.

The default model is the tiny 2-layer Llama of the test suite (built in a temporary folder): it measures what the
pipeline itself costs per row (tokenizing, batching, writing, merging), which is what can grow faster than the rows;
a real model multiplies the model part by its size (`--model` takes a model folder; the embedded SmolLM2 scores about
500 tokens/s here, so keep its sizes to a few thousand rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config(model: str, runs: Path, **run):
    from tasks.config import FewtuneConfig

    return FewtuneConfig(data={"train": "bench.jsonl"}, model={"base": model, "max_length": 128, "dtype": "float32"},
                         run={"runs_dir": str(runs), **run})


def validate_and_score(n: int, model: str, tmp: Path) -> dict[str, float]:
    from bench_validate import Generator, write

    from flows.stages import score_rows
    from tasks.common.models import load_tokenizer
    from tasks.common.records import load_records
    from tasks.validate import validate_dataset

    data = Generator(seed=n).dataset(n, max(50, min(1500, n // 10)))
    folder = tmp / f"rows-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = write(folder / "train.jsonl", data["train"]), write(folder / "eval.jsonl", data["eval"])
    cfg = _config(model, folder / "runs")
    start = time.perf_counter()
    result = validate_dataset(load_records(train_path), load_records(eval_path), cfg, folder / "validate",
                              load_tokenizer(model))
    validated = time.perf_counter()
    scored = score_rows(cfg, str(result.train_path), model, folder / "scores.parquet")
    done = time.perf_counter()
    return {"rows": n, "kept": len(scored.rows), "validate_s": validated - start, "score_s": done - validated,
            "total_s": done - start, "train_path": str(result.train_path)}


def _score_shard(model: str, rows_path: str, out_path: str, runs: str) -> str:
    import torch

    from flows.stages import score_rows

    torch.set_num_threads(1)
    score_rows(_config(model, Path(runs)), rows_path, model, out_path)
    return out_path


def dask_vs_sequential(train_path: str, model: str, workers: int, tmp: Path) -> dict[str, float]:
    from dask.distributed import Client, LocalCluster

    from flows.sharded import split_rows
    from flows.stages import score_rows
    from tasks.common.records import read_jsonl, write_jsonl
    from tasks.score import merge_scores

    cfg = _config(model, tmp / "runs")
    rows = read_jsonl(train_path)
    start = time.perf_counter()
    score_rows(cfg, train_path, model, tmp / "sequential.parquet")
    sequential = time.perf_counter() - start

    from flows.sharded import _dask_runner

    # the local cluster `run.task_runner: dask` starts (process workers, one thread each, imports preloaded)
    kwargs = _dask_runner(_config(model, tmp / "runs", dask_workers=workers, dask_processes=True)).cluster_kwargs
    up = time.perf_counter()
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        start = time.perf_counter()  # the cluster is up (workers started, imports preloaded): a running cluster's cost
        cluster_s = start - up
        paths = [str(write_jsonl(tmp / "shards" / str(i) / "rows.jsonl", shard))
                 for i, shard in enumerate(split_rows(rows, workers))]
        futures = [client.submit(_score_shard, model, p, str(Path(p).with_name("scores.parquet")), str(tmp / "runs"),
                                 pure=False) for p in paths]
        merged = merge_scores(client.gather(futures), cfg.score.outlier_z, tmp / "dask.parquet")
        on_dask = time.perf_counter() - start
    assert len(merged.rows) == len(rows)
    return {"rows": len(rows), "sequential_s": sequential, "dask_s": on_dask, "cluster_s": cluster_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="training rows per step, comma-separated")
    parser.add_argument("--dask-rows", type=int, default=10000, help="rows for the Dask comparison (0: skip it)")
    parser.add_argument("--workers", type=int, default=2, help="Dask process workers")
    parser.add_argument("--model", help="model folder (default: the test suite's tiny Llama)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fewtune-scale-"))
    model = args.model
    if model is None:
        from tiny_model import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny-model"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; model {model}")
    print(f"{'rows':>8} {'kept':>8} {'validate s':>11} {'score s':>9} {'total s':>9} {'growth':>7}")
    results, previous = [], None
    for n in (int(s) for s in args.sizes.split(",")):
        r = validate_and_score(n, model, tmp)
        growth = f"{r['total_s'] / previous['total_s']:.1f}x" if previous else "-"
        print(f"{n:>8,} {r['kept']:>8,} {r['validate_s']:>11.1f} {r['score_s']:>9.1f} {r['total_s']:>9.1f} {growth:>7}",
              flush=True)
        results.append(r)
        previous = r
    for a, b in zip(results, results[1:]):
        print(f"=> {a['rows']:,} -> {b['rows']:,} rows ({b['rows'] / a['rows']:.0f}x): validate + score cost "
              f"{b['total_s'] / a['total_s']:.1f}x (validate {b['validate_s'] / a['validate_s']:.1f}x, "
              f"score {b['score_s'] / a['score_s']:.1f}x)")
    if args.dask_rows:
        base = next((r for r in results if r["rows"] == args.dask_rows), None)
        train_path = base["train_path"] if base else validate_and_score(args.dask_rows, model, tmp)["train_path"]
        d = dask_vs_sequential(train_path, model, args.workers, tmp / "dask")
        print(f"=> scoring {d['rows']:,} rows: one process {d['sequential_s']:.1f} s, Dask {args.workers} process "
              f"workers {d['dask_s']:.1f} s ({d['sequential_s'] / d['dask_s']:.2f}x) on a running cluster; "
              f"{d['dask_s'] + d['cluster_s']:.1f} s ({d['sequential_s'] / (d['dask_s'] + d['cluster_s']):.2f}x) "
              f"counting the local cluster's start ({d['cluster_s']:.1f} s, as `run.task_runner: dask` without "
              "`run.dask_address` pays once per run)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other processes share these CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
