"""k-fold cross-validation: folds that keep derived rows with their parent, k adapters with aggregated metrics on the
tiny model, the final adapter on all rows, and the validate stage's advice to use it on small sets."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from flows.cv import cross_validate, cv_line, make_folds
from tasks.common.records import load_records
from tasks.config import ConfigError, FewtuneConfig
from tasks.train import train_adapter
from tasks.validate import validate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent


def demo_rows(n: int) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def make_cfg(folds: int) -> FewtuneConfig:
    return FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 96},
        cv={"folds": folds},
        train={"method": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        evaluate={"max_new_tokens": 8, "bootstrap_samples": 100, "memorization_rows": 0, "robustness_original": False,
                  "primary_metric": "rouge_l"},
    )


def test_folds_test_every_gold_row_once_and_keep_derived_rows_with_their_parent():
    gold = demo_rows(30)
    derived = [{**gold[i], "id": f"para-{i}", "source": "paraphrase", "parent_id": gold[i]["id"]} for i in (0, 7, 19)]
    folds = make_folds(gold + derived, 5, seed=0)
    assert len(folds) == 5
    tested = [r["id"] for _, test in folds for r in test]
    assert sorted(tested) == sorted(r["id"] for r in gold)  # every gold row tested exactly once, no derived row
    for train, test in folds:
        test_ids = {r["id"] for r in test}
        assert not test_ids & {r["id"] for r in train}
        assert not any(r.get("parent_id") in test_ids for r in train)  # a tested row's paraphrase does not train
        assert len(train) + len(test) == 33 - sum(r.get("parent_id") in test_ids for r in derived)
        assert 5 <= len(test) <= 7  # about a fifth each
    ids = [{r["id"] for r in test} for _, test in folds]
    assert [{r["id"] for r in t} for _, t in make_folds(list(reversed(gold)) + derived, 5, seed=0)] == ids  # any order
    assert [r["id"] for r in make_folds(gold, 5, seed=1)[0][1]] != [r["id"] for r in folds[0][1]]


def test_too_few_rows_for_the_folds_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"(?s)cv.folds=5 needs at least 10 gold training rows .* fix: lower cv.folds"):
        make_folds(demo_rows(9), 5, seed=0)


def test_k_fold_on_the_tiny_model_k_adapters_aggregated_metrics_and_the_final_adapter(tiny_model_dir, tmp_path):
    rows = demo_rows(24)
    probe = load_records(REPO / "examples/probe/general.jsonl").records[:8]  # data.probe: added to the shipped probe
    cfg = make_cfg(folds=3)
    result = cross_validate(rows, cfg, str(tiny_model_dir), tmp_path / "cv", probe=probe)

    assert [f.fold for f in result.folds] == [1, 2, 3]
    adapters = {f.adapter_path for f in result.folds}
    assert len(adapters) == 3 and all((Path(a) / "adapter_config.json").is_file() for a in adapters)
    assert sum(f.test_rows for f in result.folds) == 24 and all(f.train_rows + f.test_rows == 24 for f in result.folds)
    s = result.summary
    assert s["tuned"]["mean"] == pytest.approx(statistics.fmean(f.tuned for f in result.folds), abs=1e-4)
    assert s["gain"]["std"] == pytest.approx(statistics.stdev(f.gain for f in result.folds), abs=1e-4)
    assert s["forgetting"]["n"] == 3  # the general-ability probe measured forgetting in every fold
    for f, (train, test) in zip(result.folds, make_folds(rows, 3, cfg.cv.seed)):  # each fold's validation slice:
        held = {json.loads(line)["id"] for line in (Path(f.adapter_path).parent / "validation.jsonl").read_text().splitlines()}
        assert held and held < {r["id"] for r in train} and not held & {r["id"] for r in test}  # from its training rows
    assert s["tuned_eval_ppl"]["min"] <= s["tuned_eval_ppl"]["mean"] <= s["tuned_eval_ppl"]["max"]
    saved = json.loads((tmp_path / "cv" / "cv_results.json").read_text())
    assert saved["summary"] == s and saved["primary_metric"] == "rouge_l"
    line = cv_line(saved)
    assert line.startswith("3 folds: rouge_l tuned ") and "general-text perplexity" in line

    # Then the final adapter, trained on all rows with the same settings.
    final = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "final", probe=probe)
    assert (Path(final.adapter_path) / "adapter_config.json").is_file() and final.adapter_path not in adapters
    assert final.train_rows + final.validation_rows == 24


@pytest.mark.parametrize(("folds", "suggested"), [(1, True), (5, False)])
def test_validate_size_advice_suggests_cross_validation_on_small_sets(tmp_path, folds, suggested):
    cfg = make_cfg(folds)
    cfg.validate_.near_duplicates = False
    result = validate_dataset(load_records(REPO / "examples/support/train.jsonl"), None, cfg, tmp_path / "out")
    (warning,) = [w for w in result.counts["dataset_warnings"] if w.startswith("dataset_size: ")]
    assert ("cv.folds=5 trains 5 adapters" in warning) is suggested
    assert "(cv.suggest_below_rows)" in warning if suggested else "cv.folds" not in warning
