"""Compare task designs for the embedded demo (closed-book vs grounded answers), each run through the real pipeline.

Every variant is built from `examples/demo_data` (the 50 Kestrel Cycles facts, five training phrasings and one
rephrased test question each) plus `configs/demo.yaml` with the variant's overrides, then run with
`fewtune run` under `/usr/bin/time -v`, one variant at a time.

Grounded variants put the shop's relevant policy text in each row's system message, as a support desk's search would
pass it: a 50-entry knowledge base written in a terse style (a deterministic rewrite of each fact's canonical
answer, not the answer text), ranked by similarity to the user's question (TF-IDF, or all-MiniLM-L6-v2
embeddings for the `dense` variants), top k entries. Training rows that
the search misses get their entry in place of the lowest-ranked one (so the model learns to answer from the right
entry, wherever it sits); test rows get the search's top k as it stands, so a miss is a miss, except in the `oracle`
variants, whose test rows also get their own entry (a desk that passes the ticket topic's entry: `configs/demo.yaml`).
`cf`: the share of training rows given counterfactual figures (`examples/demo_data/grounding.py`).

    python benchmarks/demo_designs.py retrieval            # the search's hit rate on train and test questions
    python benchmarks/demo_designs.py build VARIANT [...]  # write data + config under OUT/VARIANT
    python benchmarks/demo_designs.py run VARIANT [...]    # build, run the pipeline, write OUT/VARIANT/figures.json
    python benchmarks/demo_designs.py table                # one row of figures per variant that has run

OUT is runs/demo-designs unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from demo_data import FACTS, grounding  # noqa: E402
from demo_data.grounding import GROUNDED_SYSTEM, counterfactual  # noqa: E402

SEED = 20240611
SYSTEM = "You are the customer support assistant of Kestrel Cycles."

# Variant: grounded (top-k entries in the system message; 0: closed book) and config overrides (deep-merged).
VARIANTS: dict[str, dict] = {
    "closed_demo": {"k": 0, "config": {}},
    "closed_strong": {
        "k": 0,
        "config": {
            "augment": {"self_distill_max_rows": 16, "paraphrase": {"n": 2, "max_rows": 64}, "max_seconds": 300},
            "train": {"lora_top_layers": None, "epochs": 3, "early_stopping_patience": 3},
        },
    },
    "grounded3_demo": {"k": 3, "config": {"model": {"max_length": 320}}},
    "grounded3_noaug": {"k": 3, "config": {"model": {"max_length": 320}, "augment": {"enabled": False}}},
    "grounded3_1ep": {"k": 3, "config": {"model": {"max_length": 320}, "train": {"epochs": 1}}},
    "grounded4_demo": {"k": 4, "config": {"model": {"max_length": 320}}},
    "grounded4_1ep": {"k": 4, "config": {"model": {"max_length": 320}, "train": {"epochs": 1}}},
    "grounded4_cf_all": {
        "k": 4,
        "cf": 0.5,
        "config": {"model": {"max_length": 320}, "train": {"lora_top_layers": None}, "evaluate": {"batch_size": 10}},
    },
    "grounded4_cf_noaug": {
        "k": 4,
        "cf": 0.5,
        "config": {"model": {"max_length": 320}, "augment": {"enabled": False}, "evaluate": {"batch_size": 10}},
    },
    "grounded3_cf_noaug": {
        "k": 3,
        "cf": 0.5,
        "config": {"model": {"max_length": 320}, "augment": {"enabled": False}, "evaluate": {"batch_size": 16}},
    },
    "grounded1_oracle_cf": {
        "k": 1,
        "cf": 1.0,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False}},
    },
    "grounded1_oracle_cf_drop": {
        "k": 1,
        "cf": 1.0,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False},
                   "evaluate": {"memorization_context": "drop_system"}},
    },
    "grounded1_search_cf_drop": {
        "k": 1,
        "cf": 1.0,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False},
                   "evaluate": {"memorization_context": "drop_system"}},
    },
    "grounded1_oracle_cf_drop_norep": {
        "k": 1,
        "cf": 1.0,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False}, "train": {"replay_fraction": 0.0},
                   "evaluate": {"memorization_context": "drop_system"}},
    },
    "grounded1_oracle_cf_drop_overfit": {
        "k": 1,
        "cf": 1.0,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False},
                   "train": {"epochs": 4, "learning_rate": 3.0e-3, "early_stopping_patience": 20,
                             "overmemorization_patience": 20},
                   "evaluate": {"memorization_context": "drop_system"}},
    },
    "grounded1_oracle_cf05": {
        "k": 1,
        "cf": 0.5,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False}},
    },
    "grounded1_oracle": {
        "k": 1,
        "oracle": True,
        "config": {"model": {"max_length": 256}, "augment": {"enabled": False}},
    },
    "grounded4_noaug": {"k": 4, "config": {"model": {"max_length": 320}, "augment": {"enabled": False}}},
    "grounded5_demo": {"k": 5, "config": {"model": {"max_length": 352}}},
}

def knowledge_base() -> list[str]:
    return grounding.knowledge_base(FACTS)


class Search:
    """TF-IDF (word 1-2 grams, sublinear tf) over each entry's text plus the customer questions already linked to it
    (the training phrasings: an FAQ-style help-desk index; test questions are never indexed). A training question is
    searched with itself left out of the index, so training rows see the search as the test rows do."""

    def __init__(self, entries: list[str], with_questions: bool = True):
        self.entries = entries
        self.with_questions = with_questions
        self._cache: dict[str, tuple] = {}

    def _index(self, leave_out: str):
        if leave_out not in self._cache:
            from sklearn.feature_extraction.text import TfidfVectorizer

            docs = [
                " ".join([e, *(q for q in f["train"] if q != leave_out and self.with_questions)])
                for e, f in zip(self.entries, FACTS)
            ]
            vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english")
            self._cache[leave_out] = (vec, vec.fit_transform(docs))
        return self._cache[leave_out]

    def top(self, question: str, k: int) -> list[int]:
        vec, matrix = self._index(question)
        scores = (matrix @ vec.transform([question]).T).toarray().ravel()
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


class DenseSearch:
    """all-MiniLM-L6-v2 (the embedder fewtune's augmentation uses) over each entry's text and the customer questions
    already linked to it: an entry scores its best cosine similarity to the question. Training questions are searched
    with themselves left out, as in `Search`."""

    def __init__(self, entries: list[str]):
        from tasks.augment.embedder import Embedder

        self.embedder = Embedder()
        self.owner = [i for i, f in enumerate(FACTS) for _ in [None, *f["train"]]]
        self.texts = [t for e, f in zip(entries, FACTS) for t in [e, *f["train"]]]
        self.matrix = self.embedder.encode(self.texts)

    def top(self, question: str, k: int) -> list[int]:
        sims = (self.matrix @ self.embedder.encode([question])[0]).tolist()
        best = [-1.0] * len(FACTS)
        for owner, text, sim in zip(self.owner, self.texts, sims):
            if text != question:
                best[owner] = max(best[owner], sim)
        return sorted(range(len(best)), key=lambda i: (-best[i], i))[:k]


def _chat(row_id: str, system: str, question: str, answer: str) -> dict:
    return {
        "id": row_id,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def build_rows(
    k: int, search_kind: str = "dense", cf: float = 0.0, oracle: bool = False
) -> tuple[list[dict], list[dict], dict]:
    """Train and test rows (the demo's order and ids) and the search's hit rates. `cf`: share of grounded training
    rows whose entry and answer get counterfactual figures (see `counterfactual`)."""
    entries = knowledge_base()
    search = (DenseSearch(entries) if search_kind == "dense" else Search(entries)) if k else None
    pairs = [(q, i) for i, f in enumerate(FACTS) for q in f["train"]]
    rng = random.Random(SEED)
    rng.shuffle(pairs)
    while any(a[1] == b[1] for a, b in zip(pairs, pairs[1:])):
        rng.shuffle(pairs)
    hits = {"train_top1": 0, "train_topk": 0, "test_top1": 0, "test_topk": 0}

    cf_rng = random.Random(SEED + 1)

    def row(row_id: str, question: str, fact: int, split: str) -> dict:
        answer = FACTS[fact]["answer"]
        if not k:
            return _chat(row_id, SYSTEM, question, answer)
        ranked = search.top(question, k)
        hits[f"{split}_top1"] += ranked[0] == fact
        hits[f"{split}_topk"] += fact in ranked
        if (split == "train" or oracle) and fact not in ranked:
            ranked[-1] = fact
        shown = {i: entries[i] for i in ranked}
        if split == "train" and cf_rng.random() < cf:
            shown[fact], answer = counterfactual(entries[fact], answer, cf_rng)
        return _chat(row_id, GROUNDED_SYSTEM.format(entries="\n".join(shown[i] for i in ranked)), question, answer)

    train = [row(f"train-{n:04d}", q, i, "train") for n, (q, i) in enumerate(pairs, 1)]
    test = [row(f"test-{n:04d}", f["test"], i, "test") for n, (i, f) in enumerate(enumerate(FACTS), 1)]
    rates = {key: v / (len(train) if key.startswith("train") else len(test)) for key, v in hits.items()}
    return train, test, rates


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build(name: str, out: Path) -> Path:
    spec = VARIANTS[name]
    folder = out / name
    (folder / "data").mkdir(parents=True, exist_ok=True)
    train, test, rates = build_rows(spec["k"], spec.get("search", "dense"), spec.get("cf", 0.0), spec.get("oracle", False))
    for split, rows in (("train", train), ("test", test)):
        with open(folder / "data" / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg = _merge(cfg, spec["config"])
    cfg["name"] = f"demo-{name}"
    cfg["data"]["train"] = str(folder / "data" / "train.jsonl")
    cfg["data"]["eval"] = str(folder / "data" / "test.jsonl")
    cfg.setdefault("run", {})["runs_dir"] = str(folder / "runs")
    cfg["register"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "retrieval.json").write_text(json.dumps(rates, indent=1))
    return path


def run(name: str, out: Path) -> dict:
    cfg = build(name, out)
    folder = cfg.parent
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "fewtune"), "run", "--config", str(cfg)]
    start = time.time()
    with open(folder / "run.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    figures = collect(folder)
    figures.update(rc=rc, wall_s=round(time.time() - start, 1))
    (folder / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def _find(obj, key: str):
    """First value under `key` anywhere in nested dicts/lists."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def collect(folder: Path) -> dict:
    """Figures of the variant's latest run: wall time and peak memory from time -v, the rest from the run folder."""
    log = (folder / "run.log").read_text(errors="replace") if (folder / "run.log").exists() else ""
    figures: dict = {"retrieval": json.loads((folder / "retrieval.json").read_text())}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    figures["peak_rss_gib"] = round(int(m.group(1)) / 2**20, 2) if m else None
    m = re.search(r"Elapsed \(wall clock\) time.*?: (\S+)", log)
    figures["elapsed"] = m.group(1) if m else None
    runs = sorted((folder / "runs").glob("*/"), key=lambda p: p.stat().st_mtime) if (folder / "runs").exists() else []
    if not runs:
        return figures
    latest = runs[-1]
    figures["run_folder"] = str(latest)
    for fname in ("summary.json", "eval_results.json"):
        hits = sorted(latest.rglob(fname))
        if hits:
            figures[fname] = json.loads(hits[0].read_text())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["retrieval", "build", "run", "table"])
    parser.add_argument("variants", nargs="*", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-designs")
    args = parser.parse_args()
    if args.action == "retrieval":
        for kind in ("tfidf", "dense"):
            for k in (1, 2, 3, 4, 5):
                print(kind, f"k={k}", build_rows(k, kind)[2])
        return
    if args.action == "table":
        for folder in sorted(args.out.glob("*/figures.json")):
            print(folder.parent.name, json.dumps(json.loads(folder.read_text()))[:2000])
        return
    for name in args.variants:
        if args.action == "build":
            print(build(name, args.out))
        else:
            print(name, json.dumps(run(name, args.out))[:2000], flush=True)


if __name__ == "__main__":
    main()
