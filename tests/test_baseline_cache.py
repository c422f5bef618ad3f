"""The base model's side of an evaluation kept between runs: a second run with the same base model, eval rows and
settings reuses every baseline part and reports the same figures; changed inputs recompute exactly the parts that
read them; a damaged file is recomputed; labelled data keeps label probabilities and the k-shot baseline."""

from __future__ import annotations

import json

import pytest
from test_evaluation import _cfg, _row, demo_slice, random_adapter  # noqa: F401  (fixtures)

from tasks.common.general_probe import load_general_probe
from tasks.common.records import training_split
from tasks.evaluate import BaselineCache, evaluate_models

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = ("seconds", "baseline_cache", "predictions_path")


def _figures(result) -> str:
    """Everything the evaluation reports but its timings and paths, as JSON (NaN, e.g. an unmeasurable fact
    accuracy, compares equal to NaN there)."""
    return json.dumps({k: v for k, v in result.to_dict().items() if k not in VOLATILE}, sort_keys=True)


def test_a_second_run_reuses_the_baseline_and_reports_the_same(tiny_model_dir, random_adapter, demo_slice,  # noqa: F811
                                                               tmp_path) -> None:
    train, tests, probe = demo_slice
    cfg = _cfg(memorization_rows=8, primary_metric="rouge_l", probe_max_rows=4, probe_max_new_tokens=4)
    trained, held_out = training_split(train, 0.1, 42)
    general = load_general_probe(probe)

    def run(name: str, rows, key: str = "k1", folder=tmp_path / "cache"):
        cache = BaselineCache(folder, key)
        result = evaluate_models(rows, general, cfg, str(tiny_model_dir), random_adapter, tmp_path / name,
                                 train_records=train, validation_records=held_out, baseline_cache=cache)
        return result, result.baseline_cache

    first, c1 = run("first", tests)
    assert c1["enabled"] and c1["reused"] == []
    assert set(c1["parts"]) == {"answers", "eval_ppl", "general_ppl", "general_answers", "memorization"}
    second, c2 = run("second", tests)
    assert c2["reused"] == sorted(c1["parts"])  # every baseline part reused
    assert _figures(second) == _figures(first)  # same metrics, intervals, forgetting, memorization
    assert second.seconds["total"] < first.seconds["total"]

    # A changed eval set recomputes what reads it; the probe and the training rows' extraction checks are reused.
    _, c3 = run("fewer", tests[:-1])
    assert c3["parts"]["answers"] == "computed" and c3["parts"]["eval_ppl"] == "computed"
    assert c3["parts"]["general_ppl"] == c3["parts"]["general_answers"] == c3["parts"]["memorization"] == "reused"
    # Another run-wide key (another base model, dtype, settings or code): nothing reused.
    assert run("other-key", tests, key="k2")[1]["reused"] == []

    # A damaged file is recomputed, with the same result; no cache: every part computed.
    damaged = sorted((tmp_path / "cache").glob("eval_ppl-*.pkl"))
    for path in damaged:
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    again, c4 = run("damaged", tests)
    assert c4["parts"]["eval_ppl"] == "computed" and c4["parts"]["answers"] == "reused"
    assert _figures(again) == _figures(first)
    off, c5 = run("off", tests, folder=None)
    assert not c5["enabled"] and c5["reused"] == [] and _figures(off) == _figures(first)


def test_labelled_runs_reuse_label_probabilities_and_the_k_shot_baseline(tiny_model_dir, random_adapter,  # noqa: F811
                                                                         tmp_path) -> None:
    rows = [
        {**_row(f"c{i}", f"Is this about {subject}?", label), "label": label}
        for i, (subject, label) in enumerate([("my order", "order"), ("the rental", "rental"), ("my bike", "repair")] * 3)
    ]
    cfg = _cfg(probe_max_rows=3, probe_max_new_tokens=4)
    results = []
    for name in ("first", "second"):
        result = evaluate_models(rows, None, cfg, str(tiny_model_dir), random_adapter, tmp_path / name,
                                 train_records=rows[:6], baseline_cache=BaselineCache(tmp_path / "cache", "k"))
        results.append(result)
    first, second = results
    assert first.task == "classification" and first.baseline_cache["reused"] == []
    assert {"answers", "k_shot"} <= set(second.baseline_cache["reused"])
    assert second.calibration == first.calibration and second.baselines == first.baselines
    assert _figures(second) == _figures(first)


@pytest.fixture(scope="module")
def top_layer_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A random LoRA adapter on the top layer only: the base model's perplexities are computed beside the tuned
    model's, the layer below run once for both."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.common.models import load_model

    torch.manual_seed(4)
    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM", layers_to_transform=[1]))
    path = tmp_path_factory.mktemp("adapter-top") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


def test_perplexities_beside_the_tuned_model_are_stored_and_equal_separate_passes(
        tiny_model_dir, top_layer_adapter, demo_slice, tmp_path, monkeypatch) -> None:  # noqa: F811
    import tasks.evaluate.stage as stage

    train, tests, probe = demo_slice
    cfg = _cfg(memorization_rows=8, primary_metric="rouge_l", probe_max_rows=4, probe_max_new_tokens=4)
    general = load_general_probe(probe)

    def run(name: str, folder=tmp_path / "cache"):
        return evaluate_models(tests, general, cfg, str(tiny_model_dir), top_layer_adapter, tmp_path / name,
                               train_records=train, baseline_cache=BaselineCache(folder, "k"))

    paired, pair = [], stage.paired_ppl
    monkeypatch.setattr(stage, "paired_ppl", lambda *a: paired.append(pair(*a)) or paired[-1])
    first = run("first")
    assert len(paired) == 2 and None not in paired  # eval rows and general text: both models from one pass each
    assert {"eval_ppl", "general_ppl"} <= set(first.baseline_cache["parts"]) and first.baseline_cache["reused"] == []
    second = run("second")  # the base model's perplexities read back, the tuned model's computed alone
    assert {"eval_ppl", "general_ppl"} <= set(second.baseline_cache["reused"])
    assert _figures(second) == _figures(first) and len(paired) == 2
    monkeypatch.setattr(stage, "adapted_from_layer", lambda _path: 0)  # each model scored in its own passes
    separate = run("separate", folder=None)
    for a, b in ((first, separate), (second, separate)):
        assert a.baseline["eval_ppl"] == pytest.approx(b.baseline["eval_ppl"], rel=1e-4)
        assert a.tuned["eval_ppl"] == pytest.approx(b.tuned["eval_ppl"], rel=1e-4)
        assert a.forgetting["signals"]["general_ppl"]["value"] == pytest.approx(
            b.forgetting["signals"]["general_ppl"]["value"], rel=1e-3, abs=1e-4)
    assert first.tuned["eval_ppl"] != pytest.approx(first.baseline["eval_ppl"], rel=1e-2)  # two models, not one twice


def test_extraction_checks_beside_the_tuned_model_equal_separate_passes(
        tiny_model_dir, top_layer_adapter, demo_slice, tmp_path, monkeypatch) -> None:  # noqa: F811
    import tasks.evaluate.memorization as memorization
    import tasks.evaluate.stage as stage

    train, tests, probe = demo_slice
    trained, held_out = training_split(train, 0.1, 42)
    cfg = _cfg(memorization_rows=8, primary_metric="rouge_l", probe_max_rows=4, probe_max_new_tokens=4)
    general = load_general_probe(probe)

    def run(name: str, folder=tmp_path / "cache"):
        return evaluate_models(tests, general, cfg, str(tiny_model_dir), top_layer_adapter, tmp_path / name,
                               train_records=train, validation_records=held_out,
                               baseline_cache=BaselineCache(folder, "k"))

    paired, pair = [], memorization.paired_extraction_checks
    monkeypatch.setattr(memorization, "paired_extraction_checks", lambda *a: paired.append(pair(*a)) or paired[-1])
    first = run("first")
    assert len(paired) == 2 and None not in paired  # training and control rows: both models from one pass each
    assert first.memorization["status"] == "measured" and first.baseline_cache["parts"]["memorization"] == "computed"
    second = run("second")  # the base model's checks read back, the tuned model's computed alone
    assert second.baseline_cache["parts"]["memorization"] == "reused" and len(paired) == 2
    monkeypatch.setattr(stage, "adapted_from_layer", lambda _path: 0)  # each model checked in its own passes
    separate = run("separate", folder=None)
    for result in (first, second):
        assert result.memorization == separate.memorization
