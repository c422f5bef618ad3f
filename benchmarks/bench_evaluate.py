"""The evaluate stage's cost: a first run against a re-run that reuses the base model's side (the nightly case).

    FEWTUNE_HOME=/tmp/fwhome python benchmarks/bench_evaluate.py [--rows demo,labelled] [--train-steps 30]

For each row set, a real adapter is trained briefly (`tasks.train.train_adapter`, `--train-steps` optimizer steps on
the set's training rows with its config), then the evaluate stage's own function (`tasks.evaluate.evaluate_models`,
as the flow calls it: eval rows, shipped general-ability probe, training rows and validation slice, baseline cache
under a temporary runs folder) runs twice:

1. **first run**: every part computed, the baseline's stored (what every run paid before the cache, and what a run
   with new eval rows, a new base model or new settings still pays);
2. **re-run** on the same base model, eval rows and settings with the adapter of a new training run (a nightly
   re-train): the baseline's parts read back, the tuned model's computed.

It prints the seconds of each part (generation, perplexity, forgetting, memorization) for both runs, the ratio of
the totals, and checks that both runs report the same baseline figures.

Row sets: `demo` (configs/demo.yaml: the support chat rows, 50 rephrased test questions), `labelled` (a CLINC150
intent task from `benchmarks/clinc_tasks.py` with fewtune's defaults for labelled rows: label scoring, zero-shot,
k-shot and TF-IDF baselines, on the domain's 450 test queries).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def demo_set():
    from tasks.common.records import load_records
    from tasks.config import load_config

    cfg = load_config(REPO / "configs/demo.yaml")
    train = load_records(REPO / "examples/support/train.jsonl").records
    evals = load_records(REPO / "examples/support/test.jsonl").records
    return cfg, train, evals, None


def labelled_set(domain: str, per_intent: int):
    from clinc_tasks import make_task, write_config

    from tasks.common.labels import label_prompt, label_set, with_label_prompt
    from tasks.common.records import load_records
    from tasks.config import load_config

    task = make_task(domain, n_train_per_intent=per_intent, seed=0, out_dir=Path(tempfile.mkdtemp()) / domain)
    cfg = load_config(write_config(task))
    train = load_records(task.train_path, "text_label").records
    evals = load_records(task.test_path, "text_label").records
    labels = label_set(cfg, train, evals)
    prompt = label_prompt(labels, cfg)
    return cfg, [with_label_prompt(r, prompt, labels) for r in train], [with_label_prompt(r, prompt, labels)
                                                                        for r in evals], labels


def bench(name: str, cfg, train, evals, labels, steps: int, tmp: Path) -> dict:
    from tasks.common.models import resolve_base_model
    from tasks.common.records import read_jsonl
    from tasks.evaluate import baseline_cache_for, evaluate_models
    from tasks.train import train_adapter

    base = resolve_base_model(cfg.model.base)
    cfg.train.max_steps = steps
    cfg.train.evals_per_epoch = 1
    runs = tmp / name
    print(f"\n{name}: {len(train)} training rows, {len(evals)} eval rows; training an adapter ({steps} steps)", flush=True)
    trained = train_adapter(train, cfg, base.path, runs / "train")
    validation = read_jsonl(trained.validation_path) if trained.validation_path else None
    out = {}
    for run in ("first", "re-run"):
        cache = baseline_cache_for(runs, cfg.evaluate.baseline_cache, False, base.fingerprint,
                                   cfg.section_hash("model", "evaluate", "score"), "bench")
        start = time.perf_counter()
        result = evaluate_models(evals, None, cfg, base.path, trained.adapter_path, runs / f"evaluate-{run}",
                                 train_records=train, validation_records=validation, labels=labels,
                                 baseline_cache=cache)
        wall = time.perf_counter() - start
        out[run] = {"seconds": result.seconds, "wall_s": wall, "reused": result.baseline_cache["reused"],
                    "baseline": result.baseline, "tuned": result.tuned, "primary": result.primary_metric,
                    "baselines": result.baselines}
        parts = ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items() if k != "total" and v)
        print(f"  {run:7} {wall:6.0f} s ({parts}); baseline parts reused: {', '.join(out[run]['reused']) or 'none'}",
              flush=True)
    same = out["first"]["baseline"] == out["re-run"]["baseline"] and out["first"]["baselines"] == out["re-run"]["baselines"]
    ratio = out["first"]["wall_s"] / out["re-run"]["wall_s"]
    primary = out["first"]["primary"]
    print(f"  => re-run {ratio:.2f}x faster than the first run; same baseline figures: {same} ({primary}: baseline "
          f"{out['first']['baseline'][primary]:.3f}, tuned {out['first']['tuned'][primary]:.3f})", flush=True)
    return {"runs": out, "ratio": ratio, "same_baseline": same}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="demo,labelled", help="row sets: demo, labelled")
    p.add_argument("--domain", default="banking", help="CLINC150 domain of the labelled rows")
    p.add_argument("--per-intent", type=int, default=20, help="training queries per intent of the labelled rows")
    p.add_argument("--train-steps", type=int, default=30, help="optimizer steps of the adapter evaluated")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows.split(","):
            made = demo_set() if name == "demo" else labelled_set(args.domain, args.per_intent)
            results[name] = bench(name, *made, args.train_steps, Path(tmp))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
