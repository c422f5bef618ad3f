"""Outcome on real labelled data: fewtune's defaults against a plain LoRA script and TF-IDF + logistic regression.

    .venv/bin/python benchmarks/bench_outcome.py [--domains banking,travel,kitchen_and_dining] [--per-intent 20]
        [--seed 0] [--oos] [--systems fewtune,plain,tfidf] [--threads N] [--out FILE] [--work DIR]
    .venv/bin/python benchmarks/bench_outcome.py --quick --tiny-model     # a smoke run: tiny subset, tiny model

For each CLINC150 task (the 15 intents of one domain, `--per-intent` training queries each, the domain's 450 test
queries; `benchmarks/clinc_tasks.py`), on the same rows and the same machine:

- fewtune defaults: `fewtune run --config <task config>` in a subprocess (offline, as the Makefile runs it; stage
  caches refreshed so every stage really runs); tuned accuracy and macro-F1, their intervals, and the baselines fewtune
  itself reports (`baselines` in eval_results.json: zero-shot and k-shot prompting, TF-IDF + LR) when present;
- plain LoRA: `benchmarks/plain_lora.py` (the Trainer + peft recipe a user would otherwise write) in a subprocess;
- TF-IDF + LR: word 1-2-grams + char_wb 2-5-grams, LogisticRegression(C=10, max_iter=2000), in this process.

Intervals of the systems run here: percentile bootstrap over test rows (1000 resamples, seed 0) from per-row
predictions. fewtune's: from its own results when they carry them, else the same bootstrap over its predictions.jsonl.
Wall time: the whole process (subprocesses: from start to exit, model loading included) and, for fewtune, its train +
evaluate stage seconds; peak memory: the subprocess's maximum resident set (wait4 rusage; this process's own for
TF-IDF). Prints one table per task and the fewtune/plain comparison, and writes every figure as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.clinc_tasks import Task, bootstrap_intervals, make_task, score  # noqa: E402

DEFAULT_DOMAINS = ("banking", "travel", "kitchen_and_dining")
SYSTEMS = ("fewtune", "plain", "tfidf")
METRICS = ("accuracy", "macro_f1")
QUICK = {"intents": 3, "per_intent": 4, "test_per_intent": 3, "steps": 2}
QUICK_FEWTUNE = ["train.max_steps=2", "train.replay_fraction=0", "evaluate.probe_max_rows=2", "evaluate.memorization_rows=0",
                 "evaluate.k_shot_max_tokens=256"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}


def with_intervals(name: str, predictions: list[str], gold: list[str], labels: list[str], **extra: Any) -> dict[str, Any]:
    figures = score(predictions, gold, labels)
    return {"system": name, **figures, "ci": bootstrap_intervals(predictions, gold, labels), "ci_source": "bench bootstrap",
            "n_test": len(gold), "outside_label_set": sum(p not in labels for p in predictions), **extra}


def run_tfidf(task: Task) -> dict[str, Any]:
    """TF-IDF (word 1-2-grams + char_wb 2-5-grams) + logistic regression, trained on the task's training rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    start = time.perf_counter()
    train, test = task.rows("train"), task.rows("test")
    model = make_pipeline(
        make_union(TfidfVectorizer(analyzer="word", ngram_range=(1, 2)), TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5))),
        LogisticRegression(C=10, max_iter=2000),
    )
    model.fit([r["text"] for r in train], [r["label"] for r in train])
    predictions = [str(p) for p in model.predict([r["text"] for r in test])]
    wall = time.perf_counter() - start
    return with_intervals("tfidf_lr", predictions, [r["label"] for r in test], task.labels, wall_s=wall,
                          peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                          peak_rss_note="this process's peak (the benchmark harness included)")


def run_process(cmd: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run `cmd` to its end (output into `log_path`); its wall time and peak resident memory (it and its children)."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "process_wall_s": time.perf_counter() - start,
            "process_peak_rss_gb": usage.ru_maxrss / 1024**2, "log": str(log_path)}


def child_env(threads: int | None, home: str | None) -> dict[str, str]:
    env = {**os.environ, **ENV}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if home:
        env["FEWTUNE_HOME"] = home
    return env


def _pair(value: Any) -> list[float] | None:
    """An interval in any of the shapes results use: [low, high], {"low", "high"}, {"ci": ...}."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [float(value[0]), float(value[1])]
    if isinstance(value, dict):
        if isinstance(value.get("low"), (int, float)) and isinstance(value.get("high"), (int, float)):
            return [float(value["low"]), float(value["high"])]
        for key in ("ci", "interval"):
            if key in value:
                return _pair(value[key])
    return None


def _own_interval(ev: dict[str, Any], side: str, metric: str) -> list[float] | None:
    """A per-model interval (not the delta's) of `metric` for `side` (`tuned`, `baseline`), if the results carry one."""
    for key in (f"{side}_intervals", f"{side}_ci"):
        found = _pair((ev.get(key) or {}).get(metric))
        if found:
            return found
    row = (ev.get("intervals") or {}).get(metric) or {}
    low, high = row.get(f"{side}_low"), row.get(f"{side}_high")
    return [float(low), float(high)] if isinstance(low, (int, float)) and isinstance(high, (int, float)) else None


def fewtune_baselines(ev: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    """The baselines fewtune measured on the same test rows (`baselines.systems` in eval_results.json: zero-shot,
    k-shot, TF-IDF + LR), with the bench's bootstrap intervals from their per-row correctness; [] when absent."""
    systems = (ev.get("baselines") or {}).get("systems") or {}
    out = []
    for name, entry in systems.items():
        row: dict[str, Any] = {"system": f"fewtune baseline: {name}", "description": entry.get("description"),
                               "ci": {}, "ci_source": "bench bootstrap of fewtune's per-row correctness (accuracy)"}
        for m in METRICS:
            row[m] = (entry.get("metrics") or {}).get(m)
        correct = entry.get("correct")
        if correct:
            hits = ["y" if c else "n" for c in correct]
            row["ci"]["accuracy"] = bootstrap_intervals(hits, ["y"] * len(hits), ["y", "n"])["accuracy"]
        out.append(row)
    return out


def known_overrides(sets: list[str]) -> list[str]:
    """The `section.field=value` overrides whose field this fewtune's config has (smoke-run shortcuts only)."""
    from tasks.config import FewtuneConfig

    sections = {f.alias or n: f.annotation for n, f in FewtuneConfig.model_fields.items()}
    out = []
    for item in sets:
        section, field = item.split("=", 1)[0].split(".", 1)
        model = sections.get(section)
        if model is not None and field in getattr(model, "model_fields", {}):
            out.append(item)
    return out


def run_fewtune(task: Task, work: Path, env: dict[str, str], extra_sets: list[str]) -> dict[str, Any]:
    """`fewtune run` on the task's config in a subprocess; its tuned and baseline figures, times and memory."""
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(task.config_path), "--set", f"run.name={name}",
           "--set", "run.refresh_cache=true"] + [x for s in known_overrides(extra_sets) for x in ("--set", s)]
    proc = run_process(cmd, env, work / f"fewtune-{task.name}.log")
    run_dir = Path(task.dir) / "runs" / name
    if proc["rc"] != 0 or not (run_dir / "eval_results.json").is_file():
        tail = Path(proc["log"]).read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"fewtune run failed (exit {proc['rc']}); log {proc['log']}:\n" + "\n".join(tail))
    ev = json.loads((run_dir / "eval_results.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    train_s = float((summary.get("train") or {}).get("seconds") or 0)
    eval_s = float(((summary.get("evaluate") or {}).get("seconds") or {}).get("total") or 0)
    rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines() if x.strip()]
    by_id = {r["id"]: r["label"] for r in task.rows("test")}
    gold = [by_id.get(r["id"], r.get("reference")) for r in rows]  # validation may have dropped test rows
    from tasks.common.measure import to_label

    sides = {}
    for side in ("tuned", "baseline"):
        predictions = [to_label(str(r.get(side, "")), task.labels) for r in rows]
        mine = with_intervals(f"fewtune {side}", predictions, gold, task.labels)
        entry: dict[str, Any] = {"system": "fewtune" if side == "tuned" else "fewtune base model (its own baseline)",
                                 "ci": {}, "ci_source": "fewtune results", "outside_label_set": mine["outside_label_set"],
                                 "n_test": len(rows),
                                 "recomputed": {m: mine[m] for m in METRICS}}
        for m in METRICS:
            entry[m] = ev[side].get(m, mine[m])
            own = _own_interval(ev, side, m)
            entry["ci"][m] = own or mine["ci"][m]
            if not own:
                entry["ci_source"] = "bench bootstrap over predictions.jsonl"
        sides[side] = entry
    gate = ((summary.get("register") or {}).get("gate") or summary.get("gate") or {})
    tuned = {**sides["tuned"], **proc, "train_s": train_s, "evaluate_s": eval_s, "wall_s": train_s + eval_s,
             "peak_rss_gb": proc["process_peak_rss_gb"], "run_dir": str(run_dir), "primary_metric": ev.get("primary_metric"),
             "gate": gate.get("decision"), "train": {k: (summary.get("train") or {}).get(k) for k in
                                                      ("method", "steps", "epochs_run", "stopped_early", "best_step")},
             "delta_intervals": {m: (ev.get("intervals") or {}).get(m) for m in METRICS}}
    return {"tuned": tuned, "base": sides["baseline"], "baselines": fewtune_baselines(ev, ev.get("labels") or [])}


def run_plain_process(task: Task, work: Path, env: dict[str, str], threads: int | None, model: str | None,
                      max_steps: int | None) -> dict[str, Any]:
    out = work / "plain" / task.name
    cmd = [sys.executable, "-m", "benchmarks.plain_lora", "--task-dir", task.dir, "--out", str(out)]
    cmd += (["--threads", str(threads)] if threads else []) + (["--model", model] if model else [])
    cmd += ["--max-steps", str(max_steps)] if max_steps else []
    proc = run_process(cmd, env, work / f"plain-{task.name}.log")
    if proc["rc"] != 0:
        tail = Path(proc["log"]).read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"plain LoRA script failed (exit {proc['rc']}); log {proc['log']}:\n" + "\n".join(tail))
    r = json.loads((out / "plain_result.json").read_text())
    row = with_intervals("plain_lora", r["predictions"], r["gold"], task.labels)
    keep = ("train_s", "generate_s", "steps", "train_loss", "threads")
    return {**row, **{k: r[k] for k in keep}, "wall_s": proc["process_wall_s"], "script_wall_s": r["wall_s"],
            "peak_rss_gb": proc["process_peak_rss_gb"], "log": proc["log"]}


def fmt_row(r: dict[str, Any]) -> str:
    def metric(m: str) -> str:
        v, ci = r.get(m), (r.get("ci") or {}).get(m)
        if not isinstance(v, (int, float)):
            return "-"
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"

    wall = r.get("wall_s")
    if r["system"] == "fewtune":
        time_text = f"{r['train_s']:.0f}+{r['evaluate_s']:.0f} s (train+evaluate); process {r['process_wall_s']:.0f} s"
    else:
        time_text = f"{wall:.1f} s" if isinstance(wall, (int, float)) else "-"
    mem = r.get("peak_rss_gb")
    return f"| {r['system']} | {metric('accuracy')} | {metric('macro_f1')} | {time_text} | " + (
        f"{mem:.2f} GiB |" if isinstance(mem, (int, float)) else "- |")


def comparisons(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """fewtune against the plain script and TF-IDF + LR: accuracy points, time ratios and the issue's three checks."""
    out: dict[str, Any] = {}
    fw, plain, tfidf = rows.get("fewtune"), rows.get("plain_lora"), rows.get("tfidf_lr")
    if fw and plain:
        out["accuracy_points_vs_plain"] = 100 * (fw["accuracy"] - plain["accuracy"])
        out["macro_f1_points_vs_plain"] = 100 * (fw["macro_f1"] - plain["macro_f1"])
        out["wall_ratio_train_evaluate_vs_plain"] = fw["wall_s"] / plain["wall_s"]
        out["wall_ratio_process_vs_plain"] = fw["process_wall_s"] / plain["wall_s"]
        out["check_5_points_above_plain"] = out["accuracy_points_vs_plain"] >= 5
        out["check_time_not_above_plain"] = fw["wall_s"] <= plain["wall_s"]
    if fw and tfidf:
        out["accuracy_points_vs_tfidf"] = 100 * (fw["accuracy"] - tfidf["accuracy"])
        out["check_not_below_tfidf"] = fw["accuracy"] >= tfidf["accuracy"]
    return out


def print_task(task: Task, result: dict[str, Any]) -> None:
    print(f"\n### {task.name}: {len(task.labels)} labels, {task.n_train} training rows, {task.n_test} test rows\n")
    print("| system | accuracy [95% CI] | macro-F1 [95% CI] | wall time | peak RSS |\n|---|---|---|---|---|")
    for r in result["systems"]:
        print(fmt_row(r))
    c = result["comparison"]
    if "accuracy_points_vs_plain" in c:
        print(f"\nfewtune vs plain: {c['accuracy_points_vs_plain']:+.1f} accuracy points "
              f"({c['macro_f1_points_vs_plain']:+.1f} macro-F1); wall time x{c['wall_ratio_train_evaluate_vs_plain']:.2f} "
              f"(train+evaluate), x{c['wall_ratio_process_vs_plain']:.2f} (whole process)")
    if "accuracy_points_vs_tfidf" in c:
        print(f"fewtune vs TF-IDF+LR: {c['accuracy_points_vs_tfidf']:+.1f} accuracy points")
    checks = {k: v for k, v in c.items() if k.startswith("check_")}
    if checks:
        print("checks: " + ", ".join(f"{k.removeprefix('check_')}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    gate = next((r.get("gate") for r in result["systems"] if r["system"] == "fewtune"), None)
    if gate:
        print(f"fewtune gate: {gate}")


def build_tiny_model(work: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import build_tiny_model as build

    return str(build(work / "tiny-model"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="CLINC150 domains, one task each")
    p.add_argument("--per-intent", type=int, default=20, help="training queries per intent (20-50 is small data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-row draw")
    p.add_argument("--oos", action="store_true", help="add CLINC150's out-of-scope queries as one more label")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"which of {', '.join(SYSTEMS)} to run")
    p.add_argument("--threads", type=int, help="CPU threads for fewtune and the plain script (default: torch's choice)")
    p.add_argument("--model", help="base model folder for fewtune and the plain script (default: the embedded SmolLM2)")
    p.add_argument("--tiny-model", action="store_true", help="use a tiny random model (tests/tiny_model.py): smoke runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first domain only, 3 intents, 4 training and 3 test queries each, 2 training steps")
    p.add_argument("--fewtune-home", help="FEWTUNE_HOME for fewtune (default: the environment's; --quick: a fresh one)")
    p.add_argument("--work", help="folder for tasks, runs and logs (default: a new folder under /tmp)")
    p.add_argument("--out", help="JSON file of every figure (default: <work>/bench_outcome.json)")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="fewtune-bench-outcome-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(work) if args.tiny_model else args.model
    home = args.fewtune_home or (str(work / "fewtune-home") if args.quick else None)
    env = child_env(args.threads, home)
    per_intent, sizes = args.per_intent, {}
    if args.quick:
        domains, per_intent = domains[:1], QUICK["per_intent"]
        sizes = {"intents": QUICK["intents"], "n_test_per_intent": QUICK["test_per_intent"]}
    print(f"bench_outcome: domains {', '.join(domains)}; {per_intent} training queries per intent, seed {args.seed}"
          f"{', out-of-scope label' if args.oos else ''}; systems {', '.join(systems)}; work folder {work}", flush=True)

    out = Path(args.out) if args.out else work / "bench_outcome.json"
    results: dict[str, Any] = {"settings": {**vars(args), "domains": domains, "per_intent": per_intent, "model": model,
                                            "work": str(work)}, "tasks": {}}
    for domain in domains:
        task = make_task(domain, per_intent, args.seed, args.oos, work / "tasks", model=model or "smollm2-135m-instruct",
                         **sizes)
        rows: dict[str, dict[str, Any]] = {}
        extra: list[dict[str, Any]] = []
        if "fewtune" in systems:
            print(f"[{task.name}] fewtune run ...", flush=True)
            fw = run_fewtune(task, work, env, QUICK_FEWTUNE if args.quick else [])
            rows["fewtune"] = fw["tuned"]
            extra = [fw["base"], *fw["baselines"]]
        if "plain" in systems:
            print(f"[{task.name}] plain LoRA script ...", flush=True)
            rows["plain_lora"] = run_plain_process(task, work, env, args.threads, model, QUICK["steps"] if args.quick else None)
        if "tfidf" in systems:
            rows["tfidf_lr"] = run_tfidf(task)
        result = {"task": {**task.__dict__}, "systems": [*rows.values(), *extra], "comparison": comparisons(rows)}
        results["tasks"][task.name] = result
        print_task(task, result)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nfigures: {out}")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - start:.0f} s)")
    sys.exit(code)
