"""Small-data intent classification tasks cut from CLINC150, and how a task's predictions are scored.

    task = make_task("banking", n_train_per_intent=20, seed=0, out_dir="/tmp/bench/banking")

A task is the 15 intents of one CLINC150 domain (optionally plus an `out_of_scope` label): `n_train_per_intent`
training queries per intent drawn from CLINC150's train split (deterministic per seed), tested on that domain's test
queries (30 per intent). The task folder holds `train.jsonl` and `test.jsonl` (fewtune `text`/`label` rows:
`{"id", "text", "label"}`), `config.yaml` (a fewtune config that sets only the data, the base model, the task type,
the registered name and the runs folder: every other field keeps fewtune's default), `task.json` (what the task is)
and `README.md` (source and licence of the rows).

Data: CLINC150 (Larson et al., "An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction",
EMNLP-IJCNLP 2019; https://github.com/clinc/oos-eval, commit 828f809), Creative Commons Attribution 3.0. Read from
`../shared/data/clinc150/` next to the repository, or from the folder in the environment variable CLINC150_DIR.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "clinc150"
OOS_LABEL = "out_of_scope"
TEST_PER_INTENT = 30  # CLINC150's test split: 30 queries per intent
MAX_TRAIN_PER_INTENT = 100  # CLINC150's train split: 100 queries per intent (and 100 oos_train queries)

ATTRIBUTION = (
    "Rows from CLINC150 (Stefan Larson et al., \"An Evaluation Dataset for Intent Classification and Out-of-Scope "
    "Prediction\", EMNLP-IJCNLP 2019; https://github.com/clinc/oos-eval, data/data_full.json, commit 828f809), "
    "licensed under Creative Commons Attribution 3.0 Unported (https://creativecommons.org/licenses/by/3.0/). "
    "Changes: a subset (one domain's intents, some training queries per intent, the out-of-scope queries as the "
    "label `out_of_scope` where present), converted to JSON Lines with ids; query texts and intent names unchanged."
)


@dataclass(frozen=True)
class Task:
    name: str
    domain: str
    labels: list[str]  # sorted
    seed: int
    n_train_per_intent: int
    oos: bool
    n_train: int
    n_test: int
    dir: str

    @property
    def train_path(self) -> Path:
        return Path(self.dir) / "train.jsonl"

    @property
    def test_path(self) -> Path:
        return Path(self.dir) / "test.jsonl"

    @property
    def config_path(self) -> Path:
        return Path(self.dir) / "config.yaml"

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The task's `train` or `test` rows."""
        path = self.train_path if split == "train" else self.test_path
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @classmethod
    def load(cls, folder: str | Path) -> "Task":
        """A task written earlier by `make_task` (its `task.json`)."""
        meta = Path(folder) / "task.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} not found: --task-dir must be a folder written by benchmarks.clinc_tasks.make_task")
        data = json.loads(meta.read_text(encoding="utf-8"))
        data["dir"] = str(Path(folder).resolve())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def data_dir() -> Path:
    folder = Path(os.environ.get("CLINC150_DIR", DEFAULT_DATA_DIR))
    if not (folder / "data_full.json").is_file() or not (folder / "domains.json").is_file():
        raise FileNotFoundError(
            f"CLINC150 not found in {folder} (data_full.json, domains.json); set CLINC150_DIR to the folder that holds them"
        )
    return folder


def load_clinc() -> tuple[dict[str, list[list[str]]], dict[str, list[str]]]:
    """CLINC150's splits (`train`, `test`, `oos_train`, ...: lists of [text, intent]) and its domains (-> 15 intents)."""
    folder = data_dir()
    full = json.loads((folder / "data_full.json").read_text(encoding="utf-8"))
    domains = json.loads((folder / "domains.json").read_text(encoding="utf-8"))
    return full, domains


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def _draw(texts: list[str], n: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """`n` distinct texts (after case and space folding), none in `exclude`, in a seeded random order."""
    pool = list(texts)
    rng.shuffle(pool)
    out: list[str] = []
    seen = set(exclude)
    for text in pool:
        if _key(text) not in seen:
            seen.add(_key(text))
            out.append(text)
            if len(out) == n:
                break
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_task(
    domain: str,
    n_train_per_intent: int = 20,
    seed: int = 0,
    oos: bool = False,
    out_dir: str | Path = "/tmp/fewtune-bench/tasks",
    n_test_per_intent: int = TEST_PER_INTENT,
    model: str = "smollm2-135m-instruct",
    intents: int | None = None,
) -> Task:
    """Write one task into `out_dir` and return it.

    `n_test_per_intent` < 30 and `intents` (the first N intents of the domain, sorted) make a smaller task for a
    smoke run; `model` is the config's `model.base` (an alias or a local folder).
    """
    full, domains = load_clinc()
    if domain not in domains:
        raise ValueError(f"unknown CLINC150 domain {domain!r}; one of {', '.join(sorted(domains))}")
    if not 1 <= n_train_per_intent <= MAX_TRAIN_PER_INTENT:
        raise ValueError(f"n_train_per_intent must be 1..{MAX_TRAIN_PER_INTENT} (CLINC150 has 100 per intent)")
    if not 1 <= n_test_per_intent <= TEST_PER_INTENT:
        raise ValueError(f"n_test_per_intent must be 1..{TEST_PER_INTENT}")
    chosen = sorted(domains[domain])[: intents or None]
    by_intent: dict[str, dict[str, list[str]]] = {i: {"train": [], "test": []} for i in chosen + [OOS_LABEL]}
    for split in ("train", "test"):
        for text, intent in full[split]:
            if intent in by_intent:
                by_intent[intent][split].append(text)
    by_intent[OOS_LABEL] = {"train": [t for t, _ in full["oos_train"]], "test": [t for t, _ in full["oos_test"]]}
    labels = sorted(chosen + ([OOS_LABEL] if oos else []))

    test_rows: list[dict[str, Any]] = []
    for intent in chosen + ([OOS_LABEL] if oos else []):  # the domain's intents, then out_of_scope
        texts = by_intent[intent]["test"]
        if len(texts) > n_test_per_intent:
            rng = random.Random(f"clinc150:{seed}:{intent}:test")
            keep = set(rng.sample(range(len(texts)), n_test_per_intent))
            texts = [t for i, t in enumerate(texts) if i in keep]
        test_rows += [{"text": t, "label": intent} for t in texts]
    test_keys = {_key(r["text"]) for r in test_rows}

    train_rows: list[dict[str, Any]] = []
    for intent in labels:
        rng = random.Random(f"clinc150:{seed}:{intent}:train")
        texts = _draw(by_intent[intent]["train"], n_train_per_intent, rng, test_keys)
        train_rows += [{"text": t, "label": intent} for t in texts]
    random.Random(f"clinc150:{seed}:{domain}:order").shuffle(train_rows)

    name = f"clinc-{domain}-{n_train_per_intent}pi-s{seed}" + ("-oos" if oos else "") + (f"-{intents}i" if intents else "")
    folder = Path(out_dir).resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", [{"id": f"train-{i + 1:04d}", **r} for i, r in enumerate(train_rows)])
    write_jsonl(folder / "test.jsonl", [{"id": f"test-{i + 1:04d}", **r} for i, r in enumerate(test_rows)])
    task = Task(name=name, domain=domain, labels=labels, seed=seed, n_train_per_intent=n_train_per_intent, oos=oos,
                n_train=len(train_rows), n_test=len(test_rows), dir=str(folder))
    (folder / "task.json").write_text(json.dumps({**asdict(task), "source": ATTRIBUTION}, indent=2) + "\n")
    (folder / "README.md").write_text(
        f"# {name}\n\nIntent classification, CLINC150 domain `{domain}`: {len(labels)} labels, {len(train_rows)} training "
        f"rows ({n_train_per_intent} per label, seed {seed}), {len(test_rows)} test rows.\n\n"
        f"Written by `benchmarks/clinc_tasks.py`.\n\n## Source and licence\n\n{ATTRIBUTION}\n"
    )
    write_config(task, model)
    return task


def write_config(task: Task, model: str = "smollm2-135m-instruct") -> Path:
    """The task's fewtune config: data, base model, task type, registered name and runs folder; defaults otherwise."""
    cfg = {
        "name": task.name,
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "format": "text_label"},
        "model": {"base": model},
        "evaluate": {"task": "classification"},
        "register": {"model_name": f"bench-{task.name}"},
        "run": {"runs_dir": str(Path(task.dir) / "runs")},
    }
    header = (
        f"# fewtune benchmark task {task.name} (benchmarks/clinc_tasks.py): only data, model, task type, registered\n"
        "# name and runs folder are set; every other field keeps fewtune's default.\n"
        "# Data: CLINC150 (Larson et al., EMNLP-IJCNLP 2019; https://github.com/clinc/oos-eval), CC BY 3.0.\n"
    )
    task.config_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return task.config_path


# ----------------------------------------------------------------------------------------------------------------
# Scoring: accuracy and macro-F1 over the task's labels, and a percentile bootstrap over test rows


def score(predictions: list[str], gold: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (averaged over `labels`; a prediction outside them is wrong for every label)."""
    import numpy as np

    p, g = _codes(predictions, gold, labels)
    return {"accuracy": float(np.mean(p == g)) if len(g) else float("nan"), "macro_f1": _macro_f1(p, g, len(labels))}


def _codes(predictions: list[str], gold: list[str], labels: list[str]):
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    p = np.array([index.get(x, -1) for x in predictions], dtype=np.int64)
    g = np.array([index[x] for x in gold], dtype=np.int64)
    return p, g


def _macro_f1(p, g, n_labels: int) -> float:
    import numpy as np

    tp = np.bincount(g[p == g], minlength=n_labels)[:n_labels]
    support = np.bincount(g, minlength=n_labels)[:n_labels]
    predicted = np.bincount(p[p >= 0], minlength=n_labels)[:n_labels]
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def bootstrap_intervals(
    predictions: list[str], gold: list[str], labels: list[str], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1 over resamples of the test rows."""
    import numpy as np

    p, g = _codes(predictions, gold, labels)
    rng = np.random.default_rng(seed)
    n = len(g)
    acc, f1 = np.empty(samples), np.empty(samples)
    for s in range(samples):
        idx = rng.integers(0, n, n)
        acc[s] = np.mean(p[idx] == g[idx])
        f1[s] = _macro_f1(p[idx], g[idx], len(labels))
    tail = (1 - confidence) / 2 * 100
    return {
        "accuracy": [float(x) for x in np.percentile(acc, [tail, 100 - tail])],
        "macro_f1": [float(x) for x in np.percentile(f1, [tail, 100 - tail])],
    }
