"""The evaluate stage's cost: a first run against a re-run that reuses the base model's side (the nightly case).

    FEWTUNE_HOME=/tmp/fwhome python benchmarks/bench_evaluate.py [--rows demo,labelled] [--train-steps 30]
                                                                 [--reference 1664fad] [--repeat 3]

For each row set, a real adapter is trained briefly (`tasks.train.train_adapter`, `--train-steps` optimizer steps on
the set's training rows with its config), then the evaluate stage's own function (`tasks.evaluate.evaluate_models`,
as the flow calls it: eval rows, shipped general-ability probe, training rows and validation slice, baseline cache
under a temporary runs folder) runs three times on the same adapter and rows, each in a fresh child process with the
same Python environment (timed around the call, model loading included):

0. **reference**: the evaluate stage of an earlier revision of fewtune (`--reference`, default 1664fad: the code
   before the evaluation speed-ups), checked out with `git worktree` into a temporary folder (its own defaults and,
   for the closed-book rows, its own configs/demo.yaml; settings added after it are left out, and printed);
1. **first run**: every part computed, the baseline's stored (what every run paid before the cache, and what a run
   with new eval rows, a new base model or new settings still pays);
2. **re-run** on the same base model, eval rows and settings with the adapter of a new training run (a nightly
   re-train): the baseline's parts read back, the tuned model's computed.

It prints the seconds of each part (generation, perplexity, forgetting, memorization) of each run, the ratios of
the totals to the reference's (with `--repeat N`: N rounds of the three runs, the medians of the rounds' ratios),
and checks that the runs report the same baseline figures (the reference's too,
where its code computes them the same way).

Row sets: `demo` (configs/closed-book.yaml: the support chat rows, 50 rephrased test questions, the demo's rows
and settings when the reference was recorded), `grounded` (the current demo, configs/demo.yaml: the helpdesk rows,
each question with its policy entry in the system message; the extraction check with the entry kept, as the
reference asks it), `labelled` (a CLINC150
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def demo_set():
    from tasks.common.records import load_records
    from tasks.config import load_config

    # The closed-book support rows and settings: the demo the recorded reference ran (its own configs/demo.yaml).
    cfg = load_config(REPO / "configs/closed-book.yaml")
    train = load_records(REPO / "examples/support/train.jsonl").records
    evals = load_records(REPO / "examples/support/test.jsonl").records
    return cfg, train, evals, None, (Path("configs/demo.yaml"), Path("configs/closed-book.yaml"))


def grounded_set(tmp: Path):
    """The current demo (configs/demo.yaml: helpdesk rows, each question with its policy entry), with the extraction
    check asked as the reference asks it (`memorization_context: keep`, which it predates): the same work on both
    sides."""
    import yaml

    from tasks.common.records import load_records
    from tasks.config import load_config

    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    raw["evaluate"]["memorization_context"] = "keep"
    for k in ("train", "eval"):
        raw["data"][k] = str((REPO / "configs" / raw["data"][k]).resolve())
    path = tmp / "grounded.yaml"
    path.write_text(yaml.safe_dump(raw))
    train = load_records(REPO / "examples/helpdesk/train.jsonl").records
    evals = load_records(REPO / "examples/helpdesk/test.jsonl").records
    return load_config(path), train, evals, None, (path, path)


def labelled_set(domain: str, per_intent: int):
    from clinc_tasks import make_task, write_config

    from tasks.common.labels import label_prompt, label_set, with_label_prompt
    from tasks.common.records import load_records
    from tasks.config import load_config

    task = make_task(domain, n_train_per_intent=per_intent, seed=0, out_dir=Path(tempfile.mkdtemp()) / domain)
    config_path = write_config(task)
    cfg = load_config(config_path)
    train = load_records(task.train_path, "text_label").records
    evals = load_records(task.test_path, "text_label").records
    labels = label_set(cfg, train, evals)
    prompt = label_prompt(labels, cfg)
    return (cfg, [with_label_prompt(r, prompt, labels) for r in train],
            [with_label_prompt(r, prompt, labels) for r in evals], labels, (config_path, config_path))


REFERENCE_DRIVER = r"""
import json, sys, time
spec = json.loads(open(sys.argv[1]).read())
sys.path.insert(0, spec["root"])
from pathlib import Path
import yaml
from tasks.common.records import read_jsonl
from tasks.config import FewtuneConfig, load_config
from tasks.evaluate import evaluate_models

def prune(data, model):  # the settings this code knows (an earlier revision lacks later fields), names dropped
    fields = getattr(model, "model_fields", None)
    if not isinstance(data, dict) or fields is None:
        return data, []
    named = {**fields, **{f.alias: f for f in fields.values() if f.alias}}  # `register` is field register_
    kept, dropped = {}, []
    for key, value in data.items():
        if key not in named:
            dropped.append(key)
            continue
        sub = named[key].annotation
        if isinstance(value, dict) and hasattr(sub, "model_fields"):
            value, more = prune(value, sub)
            dropped += [f"{key}.{m}" for m in more]
        kept[key] = value
    return kept, dropped

config = Path(spec["config"])
raw = yaml.safe_load(config.read_text())
known, dropped = prune(raw, FewtuneConfig)
if dropped:  # a copy without them (data paths made absolute: the copy lives elsewhere)
    for k in ("train", "eval"):
        if isinstance(known.get("data", {}).get(k), str):
            known["data"][k] = str((config.parent / known["data"][k]).resolve())
    config = Path(spec["out"]) / "config-known.yaml"
    config.write_text(yaml.safe_dump(known))
cfg = load_config(config)
kwargs = {"train_records": read_jsonl(spec["train"])}
if spec.get("validation"):
    kwargs["validation_records"] = read_jsonl(spec["validation"])
if spec.get("labels"):
    kwargs["labels"] = spec["labels"]
if spec.get("cache"):  # the current code: its baseline cache under the benchmark's runs folder
    from tasks.evaluate import baseline_cache_for
    kwargs["baseline_cache"] = baseline_cache_for(*spec["cache"])
start = time.perf_counter()
result = evaluate_models(read_jsonl(spec["evals"]), None, cfg, spec["base"], spec["adapter"], spec["out"], **kwargs)
print("REFERENCE " + json.dumps({"wall_s": time.perf_counter() - start, "seconds": result.seconds, "dropped": dropped,
                                 "baseline": result.baseline, "tuned": result.tuned,
                                 "reused": (getattr(result, "baseline_cache", None) or {}).get("reused", []),
                                 "primary": getattr(result, "primary_metric", None),
                                 "baselines": getattr(result, "baselines", None)}))
"""


def reference_checkout(rev: str, tmp: Path) -> Path:
    """The repository at `rev` in a temporary worktree (removed by `git worktree prune` once `tmp` is gone)."""
    import subprocess

    where = tmp / f"fewtune-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def run_reference(root: Path, config: Path, base: str, adapter: str, train, evals, validation, labels,
                  out: Path, cache: list | None = None) -> dict:
    """The evaluate stage of the code under `root` on the same inputs, in a child process (its code, this
    environment). `cache`: the arguments of `baseline_cache_for` (the current code's runs)."""
    import subprocess

    from tasks.common.records import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    spec = {"root": str(root), "config": str(config), "base": base, "adapter": adapter, "out": str(out),
            "train": str(write_jsonl(out / "train.jsonl", train)), "evals": str(write_jsonl(out / "evals.jsonl", evals)),
            "validation": str(validation) if validation else None, "labels": labels, "cache": cache}
    (out / "spec.json").write_text(json.dumps(spec))
    (out / "driver.py").write_text(REFERENCE_DRIVER)
    done = subprocess.run([sys.executable, str(out / "driver.py"), str(out / "spec.json")], cwd=str(root),
                          capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("REFERENCE ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"the reference evaluation failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("REFERENCE "))


def bench(name: str, cfg, train, evals, labels, configs: tuple[Path, Path], steps: int, tmp: Path,
          reference: Path | None, repeat: int = 1) -> dict:
    """`configs`: (the reference's config, the current code's): relative paths are files of each checkout.
    `repeat`: rounds of (reference, first run, re-run) on the same adapter, each round's first run on an empty
    baseline cache; the ratios are the medians of the rounds' (a round's runs are minutes apart: this machine's speed
    drifts by 10-30% over longer spans)."""
    from statistics import median

    from tasks.common.models import resolve_base_model
    from tasks.train import train_adapter

    base = resolve_base_model(cfg.model.base)
    cfg.train.max_steps = steps
    cfg.train.evals_per_epoch = 1
    runs = tmp / name
    print(f"\n{name}: {len(train)} training rows, {len(evals)} eval rows; training an adapter ({steps} steps)", flush=True)
    trained = train_adapter(train, cfg, base.path, runs / "train")
    rounds = []
    for r in range(repeat):
        out = {}
        where = runs / f"round-{r}"
        if reference is not None:  # a relative config path: the reference's own file (the demo's)
            ref = run_reference(reference, reference / configs[0], base.path, trained.adapter_path, train, evals,
                                trained.validation_path, labels, where / "reference")
            out["reference"] = ref
            parts = ", ".join(f"{k} {v:.0f}" for k, v in ref["seconds"].items() if k != "total" and v)
            print(f"  {'reference':9} {ref['wall_s']:6.0f} s ({parts})" + (
                f"; settings it predates, left out: {', '.join(ref['dropped'])}" if ref.get("dropped") else ""), flush=True)
        for run in ("first", "re-run"):  # each in its own child process, as the reference
            cache = [str(where), cfg.evaluate.baseline_cache, False, base.fingerprint,
                     cfg.section_hash("model", "evaluate", "score"), "bench"]
            out[run] = run_reference(REPO, REPO / configs[1], base.path,
                                     trained.adapter_path, train, evals, trained.validation_path, labels,
                                     where / f"evaluate-{run}", cache)
            parts = ", ".join(f"{k} {v:.0f}" for k, v in out[run]["seconds"].items() if k != "total" and v)
            print(f"  {run:9} {out[run]['wall_s']:6.0f} s ({parts}); baseline parts reused: "
                  f"{', '.join(out[run]['reused']) or 'none'}", flush=True)
        rounds.append(out)
    out = rounds[0]
    same = all(json.dumps(o["first"]["baseline"]) == json.dumps(out["first"]["baseline"]) ==
               json.dumps(o["re-run"]["baseline"]) and o["first"]["baselines"] == o["re-run"]["baselines"]
               for o in rounds)
    ratio = median(o["first"]["wall_s"] / o["re-run"]["wall_s"] for o in rounds)
    primary = out["first"]["primary"]
    print(f"  => re-run {ratio:.2f}x faster than the first run; same baseline figures: {same} ({primary}: baseline "
          f"{out['first']['baseline'][primary]:.3f}, tuned {out['first']['tuned'][primary]:.3f})", flush=True)
    figures = {"runs": rounds, "ratio": ratio, "same_baseline": same}
    if "reference" in out:
        ref = out["reference"]
        shared = sorted(k for k in ref["baseline"] if k in out["first"]["baseline"])
        diff = {k: (ref["baseline"][k], out["first"]["baseline"][k]) for k in shared
                if json.dumps(ref["baseline"][k]) != json.dumps(out["first"]["baseline"][k])}
        for run in ("first", "re-run"):
            each = [o["reference"]["wall_s"] / o[run]["wall_s"] for o in rounds]
            figures[f"reference/{run}"] = median(each)
            figures[f"reference/{run}/rounds"] = each
        rounds_note = "" if repeat == 1 else " (median of {} rounds: first {}; re-run {})".format(
            repeat, ", ".join(f"{x:.2f}" for x in figures["reference/first/rounds"]),
            ", ".join(f"{x:.2f}" for x in figures["reference/re-run/rounds"]))
        print(f"  => against the reference: first run {figures['reference/first']:.2f}x, re-run "
              f"{figures['reference/re-run']:.2f}x faster{rounds_note}; baseline figures that differ from the "
              f"reference's: {diff or 'none'}", flush=True)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="demo,labelled", help="row sets: demo, grounded, labelled")
    p.add_argument("--domain", default="banking", help="CLINC150 domain of the labelled rows")
    p.add_argument("--per-intent", type=int, default=20, help="training queries per intent of the labelled rows")
    p.add_argument("--train-steps", type=int, default=30, help="optimizer steps of the adapter evaluated")
    p.add_argument("--reference", default="1664fad", help="git revision whose evaluate stage is the reference "
                   "('' to skip)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of (reference, first run, re-run); ratios are the "
                   "medians of the rounds'")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = reference_checkout(args.reference, Path(tmp)) if args.reference else None
        try:
            for name in args.rows.split(","):
                made = (demo_set() if name == "demo" else grounded_set(Path(tmp)) if name == "grounded"
                        else labelled_set(args.domain, args.per_intent))
                results[name] = bench(name, *made, args.train_steps, Path(tmp), reference, args.repeat)
        finally:
            if reference is not None:
                import subprocess

                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(reference)],
                               capture_output=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
