"""The outcome benchmark's parts on real data: CLINC150 tasks, the TF-IDF + LR reference, and the plain LoRA script.

The tasks are cut from CLINC150 (../shared/data/clinc150, CC BY 3.0; benchmarks/clinc_tasks.py); the module is
skipped where that folder is absent. The plain script runs end to end on the tiny random model.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import clinc_tasks  # noqa: E402
from benchmarks.clinc_tasks import OOS_LABEL, Task, load_clinc, make_task, score  # noqa: E402

try:
    clinc_tasks.data_dir()
except FileNotFoundError as exc:
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clinc():
    return load_clinc()


def test_make_task_writes_a_real_domain_with_the_right_counts(tmp_path, clinc):
    full, domains = clinc
    task = make_task("banking", n_train_per_intent=20, seed=0, out_dir=tmp_path)
    train, test = task.rows("train"), task.rows("test")

    assert task.labels == sorted(domains["banking"]) and len(task.labels) == 15
    assert Counter(r["label"] for r in train) == {label: 20 for label in task.labels}
    assert Counter(r["label"] for r in test) == {label: 30 for label in task.labels}
    assert (task.n_train, task.n_test) == (300, 450)
    # The domain's whole test split, and training rows from CLINC150's train split only, none repeating a test query.
    assert {(r["text"], r["label"]) for r in test} == {(t, i) for t, i in full["test"] if i in domains["banking"]}
    source_train = {(t, i) for t, i in full["train"]}
    assert all((r["text"], r["label"]) in source_train for r in train)
    assert not {r["text"].casefold() for r in train} & {r["text"].casefold() for r in test}
    assert len({r["text"] for r in train}) == 300
    assert all(set(r) == {"id", "text", "label"} for r in train + test)
    assert len({r["id"] for r in train + test}) == 750
    assert "CC BY 3.0" in task.config_path.read_text()
    assert "Creative Commons Attribution 3.0" in (Path(task.dir) / "README.md").read_text()

    again = make_task("banking", n_train_per_intent=20, seed=0, out_dir=tmp_path / "again")
    other = make_task("banking", n_train_per_intent=20, seed=1, out_dir=tmp_path / "other")
    assert again.train_path.read_text() == task.train_path.read_text()  # deterministic per seed
    assert {r["text"] for r in other.rows("train")} != {r["text"] for r in train}
    assert Task.load(task.dir) == task


def test_out_of_scope_label_gets_as_many_rows_as_one_intent(tmp_path, clinc):
    full, domains = clinc
    task = make_task("travel", n_train_per_intent=25, seed=3, oos=True, out_dir=tmp_path)
    train, test = task.rows("train"), task.rows("test")
    assert task.labels == sorted(domains["travel"] + [OOS_LABEL]) and len(task.labels) == 16
    assert Counter(r["label"] for r in train) == {label: 25 for label in task.labels}
    assert Counter(r["label"] for r in test) == {label: 30 for label in task.labels}
    oos_train, oos_test = {t for t, _ in full["oos_train"]}, {t for t, _ in full["oos_test"]}
    assert all(r["text"] in oos_train for r in train if r["label"] == OOS_LABEL)
    assert all(r["text"] in oos_test for r in test if r["label"] == OOS_LABEL)


def test_task_config_loads_with_fewtune_defaults(tmp_path):
    from tasks.config import FewtuneConfig, load_config

    task = make_task("home", n_train_per_intent=20, seed=0, out_dir=tmp_path)
    cfg = load_config(task.config_path)
    assert cfg.data.train == str(task.train_path) and cfg.data.eval == str(task.test_path)
    assert cfg.data.format == "text_label" and cfg.evaluate.task == "classification"
    assert cfg.model.base == "smollm2-135m-instruct"
    assert cfg.register_.model_name == f"bench-{task.name}"
    assert Path(cfg.run.runs_dir) == Path(task.dir) / "runs"
    default = FewtuneConfig(data={"train": "x"})  # every training and evaluation setting is fewtune's default
    assert cfg.train == default.train and cfg.model.dtype == default.model.dtype
    assert cfg.evaluate.primary_metric == default.evaluate.primary_metric


def test_scoring_matches_scikit_learn_and_counts_unknown_answers_wrong():
    from sklearn.metrics import f1_score

    labels = ["a", "b", "c"]
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "pop_up", "c", "a"]
    s = score(pred, gold, labels)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    ci = clinc_tasks.bootstrap_intervals(pred, gold, labels, samples=200)
    assert ci["accuracy"][0] <= s["accuracy"] <= ci["accuracy"][1] and ci["accuracy"][0] < ci["accuracy"][1]


def test_tfidf_lr_on_a_real_task_is_a_strong_reference(tmp_path):
    from benchmarks.bench_outcome import run_tfidf

    task = make_task("kitchen_and_dining", n_train_per_intent=20, seed=0, out_dir=tmp_path)
    result = run_tfidf(task)
    assert result["accuracy"] > 0.5 and result["macro_f1"] > 0.5
    assert result["n_test"] == 450 and result["outside_label_set"] == 0
    low, high = result["ci"]["accuracy"]
    assert low < result["accuracy"] < high


def test_plain_lora_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    from benchmarks.plain_lora import encode_train, run_plain

    task = make_task("banking", n_train_per_intent=2, seed=0, out_dir=tmp_path, n_test_per_intent=1, intents=3)
    result = run_plain(task, tmp_path / "plain", threads=1, model_path=str(tiny_model_dir), max_steps=2)

    assert result["steps"] == 2 and result["test_rows"] == 3 and len(result["predictions"]) == 3
    assert 0 <= result["accuracy"] <= 1 and result["train_s"] > 0 and result["generate_s"] > 0
    assert result["peak_rss_gb"] > 0
    saved = json.loads((tmp_path / "plain" / "plain_result.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    rows = [json.loads(x) for x in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [r["label"] for r in task.rows("test")]
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in rows)

    # The loss is on the answer only: the labels are -100 up to the assistant turn, then the answer's own tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    row = task.rows("train")[0]
    enc = encode_train(tok, row, task.labels)
    answer = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert tok.decode(answer).strip().startswith(row["label"])
    assert enc["labels"][: len(enc["labels"]) - len(answer)] == [-100] * (len(enc["labels"]) - len(answer))


def test_fewtune_baselines_are_read_from_the_evaluation_with_intervals() -> None:
    from benchmarks.bench_outcome import fewtune_baselines

    ev = {"labels": ["a", "b"], "baselines": {"systems": {"tfidf_lr": {
        "description": "TF-IDF", "metrics": {"accuracy": 0.75, "macro_f1": 0.7}, "correct": [True, True, True, False]}}}}
    (row,) = fewtune_baselines(ev, ev["labels"])
    assert row["system"] == "fewtune baseline: tfidf_lr" and (row["accuracy"], row["macro_f1"]) == (0.75, 0.7)
    low, high = row["ci"]["accuracy"]
    assert 0 <= low <= 0.75 <= high <= 1
    assert fewtune_baselines({}, []) == []
