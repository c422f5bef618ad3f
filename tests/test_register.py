"""Promotion gate, MLflow registry round trip, champion comparison and `fewtune models list | promote | rollback`.

Fast tests use the tiny model and a real LoRA adapter with random weights; the sabotaged fine-tune (learning rate
x100) runs on the real base model and is marked `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tasks import register
from tasks.common.generation import generate_answers, load_tuned, settings_from
from tasks.common.models import load_model, load_tokenizer
from tasks.common.records import load_records
from tasks.common.registry import CHALLENGER, CHAMPION, RegistryError
from tasks.config import FewtuneConfig
from tasks.evaluate import evaluate_models
from tasks.register import gate_decision, register_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


def _iv(baseline: float, tuned: float, low: float, high: float, metric: str = "rouge_l") -> dict:
    return {"metric": metric, "n": 50, "baseline": baseline, "tuned": tuned, "delta": tuned - baseline, "low": low, "high": high,
            "higher_is_better": True}


def _evaluation(low: float = 0.05, forgetting: float | None = 0.09, excess: float | None = 0.0) -> dict:
    """An evaluation result as evaluate_models writes it (only the fields the gate reads)."""
    ev = {
        "primary_metric": "rouge_l",
        "bootstrap": {"confidence": 0.95},
        "intervals": {"rouge_l": _iv(0.086, 0.184, low, 0.14)},
        "forgetting": None,
        "memorization": None,
    }
    if forgetting is not None:
        ev["forgetting"] = {"baseline_ppl": 2.64, "tuned_ppl": 2.64 * (1 + forgetting), "probe_rows": 50,
                            "relative_increase": {"value": forgetting, "low": forgetting - 0.03, "high": forgetting + 0.03}, "metric": None}
    if excess is not None:
        rates = {"train": {"exact": 0.5, "near_verbatim": 0.6}, "control": {"exact": 0.5, "near_verbatim": 0.6 - excess}}
        ev["memorization"] = {
            "baseline": {"train": {"exact": 0.0, "near_verbatim": 0.0}, "control": {"exact": 0.0, "near_verbatim": 0.0}},
            "tuned": rates,
            "excess_exact": {"value": 0.0, "low": -0.1, "high": 0.1},
            "excess_near_verbatim": {"value": excess, "low": excess - 0.1, "high": excess + 0.1},
        }
    return ev


def _cfg(**register) -> FewtuneConfig:
    return FewtuneConfig(data={"train": "-"}, register=register)


def _criteria(gate) -> dict[str, bool]:
    return {c.name: c.passed for c in gate.criteria}


# ---------------------------------------------------------------------------------------------------------------
# The gate's criteria


def test_gate_promotes_only_when_every_criterion_passes() -> None:
    gate = gate_decision(_evaluation(), _cfg(), None)
    assert gate.promoted and _criteria(gate) == {"task_gain": True, "forgetting": True, "memorization": True, "champion": True}
    assert gate.decision.startswith("promoted: all 4 criteria passed")
    values = {c.name: c.value for c in gate.criteria}
    assert values["task_gain"] == 0.05 and values["forgetting"] == 0.09 and values["memorization"] == 0.0


def test_gain_is_judged_on_the_interval_lower_end_not_the_point_estimate() -> None:
    # A +0.098 gain whose interval reaches below zero is not a reliable gain.
    gate = gate_decision(_evaluation(low=-0.01), _cfg(), None)
    assert not gate.promoted and _criteria(gate)["task_gain"] is False
    assert "failed task_gain" in gate.decision
    assert not gate_decision(_evaluation(low=0.05), _cfg(min_gain=0.06), None).promoted


@pytest.mark.parametrize(("forgetting", "passes"), [(0.09, True), (0.2, True), (0.21, False), (1.5, False), (float("nan"), False)])
def test_forgetting_within_epsilon(forgetting: float, passes: bool) -> None:
    gate = gate_decision(_evaluation(forgetting=forgetting), _cfg(max_forgetting=0.2), None)
    assert _criteria(gate)["forgetting"] is passes and gate.promoted is passes


@pytest.mark.parametrize(("excess", "passes"), [(0.0, True), (0.1, True), (0.25, False)])
def test_memorization_within_tau(excess: float, passes: bool) -> None:
    gate = gate_decision(_evaluation(excess=excess), _cfg(max_memorization=0.1), None)
    assert _criteria(gate)["memorization"] is passes


def test_memorization_measure_is_configurable() -> None:
    ev = _evaluation(excess=0.3)  # near-verbatim excess 0.3, exact excess 0.0
    assert not gate_decision(ev, _cfg(), None).promoted
    assert gate_decision(ev, _cfg(memorization_measure="exact"), None).promoted


def test_unmeasured_criteria_are_named_not_silently_passed() -> None:
    gate = gate_decision(_evaluation(forgetting=None, excess=None), _cfg(), None)
    details = {c.name: c.detail for c in gate.criteria}
    assert details["forgetting"] == "not measured: no probe set (data.probe)"
    assert details["memorization"].startswith("not measured")
    assert all(c.value is None for c in gate.criteria if c.name in ("forgetting", "memorization"))


def test_champion_must_be_beaten_on_the_same_rows() -> None:
    champ = {"version": "3", "how": "recorded row scores", "n": 50, "champion": 0.2, "challenger": 0.184, "delta": -0.016, "low": -0.05, "high": 0.02}
    gate = gate_decision(_evaluation(), _cfg(), champ)
    assert not gate.promoted and _criteria(gate)["champion"] is False
    assert "champion version 3" in next(c.detail for c in gate.criteria if c.name == "champion")
    better = {**champ, "challenger": 0.25, "delta": 0.05, "low": -0.01, "high": 0.1}
    assert gate_decision(_evaluation(), _cfg(), better).promoted


# ---------------------------------------------------------------------------------------------------------------
# Registry: round trip, aliases, champion comparison, models list / promote / rollback (tiny model)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[str]:
    """Two real LoRA adapters of the tiny model with different random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            load_model(str(tiny_model_dir)),
            LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
        )
        path = tmp_path_factory.mktemp(f"adapter{seed}") / "adapter"
        model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


@pytest.fixture()
def registry_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWTUNE_HOME", str(tmp_path / "home"))
    train = load_records(REPO / "examples/support/train.jsonl").records[:40]
    answers = {r["messages"][-1]["content"] for r in train}
    tests = [r for r in load_records(REPO / "examples/support/test.jsonl").records if r["messages"][-1]["content"] in answers][:5]
    cfg = FewtuneConfig(
        name="regtest",
        data={"train": "-"},
        model={"max_length": 96},
        evaluate={"max_new_tokens": 6, "batch_size": 8, "bootstrap_samples": 200, "memorization_rows": 8},
        register={"model_name": "regtest-model", "min_gain": -1.0, "max_forgetting": 10.0, "max_memorization": 1.0},
    )
    return cfg, train, tests


def _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapter, out: Path, train_key: str, eval_hash: str = "evalhash"):
    evaluation = evaluate_models(tests, None, cfg, str(tiny_model_dir), adapter, out, train_records=train).to_dict()
    return evaluation, register_model(
        cfg,
        run_name=out.name,
        adapter_path=adapter,
        base_path=str(tiny_model_dir),
        base_spec=str(tiny_model_dir),
        evaluation=evaluation,
        lineage={"train_key": train_key, "data_train_hash": "trainhash", "data_eval_hash": eval_hash, "run_name": out.name},
        system_prompt=None,
        eval_records=tests,
        artifacts={"predictions.jsonl": evaluation["predictions_path"]},
    )


def test_registered_model_loads_back_with_the_adapter_weights(registry_cfg, tiny_model_dir, adapters, tmp_path) -> None:
    """The round trip: the pyfunc loaded from the registry computes exactly what the adapter computes, not the base."""
    import mlflow
    import pandas as pd
    import torch

    cfg, train, tests = registry_cfg
    evaluation, reg = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    assert reg.version == "1" and reg.aliases == [CHALLENGER, CHAMPION] and reg.promoted

    mlflow.set_tracking_uri(reg.tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{cfg.register_.model_name}@{CHAMPION}")
    served = loaded.unwrap_python_model().model
    tok = load_tokenizer(str(tiny_model_dir))
    direct = load_tuned(load_model(str(tiny_model_dir)), adapters[0])
    base = load_model(str(tiny_model_dir))
    ids = torch.tensor([tok("Are you open on Sundays?")["input_ids"]])
    with torch.inference_mode():
        served_logits, direct_logits, base_logits = (m(input_ids=ids).logits for m in (served, direct, base))
    assert torch.allclose(served_logits, direct_logits, atol=1e-5)
    assert not torch.allclose(served_logits, base_logits, atol=1e-2)

    # predict() on whole conversations answers exactly as the evaluation did.
    conversations = [r["messages"][:-1] for r in tests]
    answers = loaded.predict(pd.DataFrame({"messages": [json.dumps(c) for c in conversations]}))
    assert answers == generate_answers(direct, tok, conversations, settings_from(cfg), "t")
    assert answers == [e["tuned"] for e in json.loads(json.dumps(evaluation["examples"]))][: len(answers)]
    single = loaded.predict(pd.DataFrame({"prompt": ["When are you open?"]}))
    assert len(single) == 1 and isinstance(single[0], str)

    # Tags and the logged run: lineage, code version, gate decision, metrics with intervals, artifacts.
    from mlflow import MlflowClient

    client = MlflowClient(reg.tracking_uri)
    version = client.get_model_version(cfg.register_.model_name, "1")
    assert version.tags["train_key"] == "key-1" and version.tags["data_train_hash"] == "trainhash"
    assert version.tags["base_model"] == str(tiny_model_dir) and version.tags["code_version"]
    assert version.tags["promoted"] == "true" and version.tags["gate.task_gain"] == "pass"
    run = client.get_run(reg.run_id)
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert "delta_rouge_l_low" in run.data.metrics and run.data.metrics["gate_promoted"] == 1.0
    logged = {a.path for a in client.list_artifacts(reg.run_id)}
    assert {"evaluation.json", "gate.json", "predictions.jsonl"} <= logged
    assert client.get_experiment(reg.experiment_id).name == "fewtune-regtest"


def test_champion_comparison_history_promote_and_rollback(registry_cfg, tiny_model_dir, adapters, tmp_path) -> None:
    from mlflow import MlflowClient

    cfg, train, tests = registry_cfg
    _, first = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    assert first.promoted and first.champion_before is None

    # Same adapter retrained under another key: same rows, same settings -> the champion's recorded row scores are
    # compared; equal scores do not beat the champion, so it stays.
    _, same = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run2", "key-2")
    champ = next(c for c in same.gate["criteria"] if c["name"] == "champion")
    assert champ["value"] == 0.0 and not champ["passed"] and "recorded row scores" in champ["detail"]
    assert not same.promoted and same.aliases == [CHALLENGER]

    # Other test-set hash: the champion's registered model answers these rows again.
    cfg_margin = cfg.model_copy(update={"register_": cfg.register_.model_copy(update={"champion_margin": -1.0})})
    _, other = _evaluate_and_register(cfg_margin, train, tests, tiny_model_dir, adapters[1], tmp_path / "run3", "key-3", eval_hash="other")
    champ = next(c for c in other.gate["criteria"] if c["name"] == "champion")
    assert "re-evaluated" in champ["detail"] and other.promoted and other.champion_before == "1"

    client = MlflowClient(first.tracking_uri)
    name = cfg.register_.model_name
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "3"
    assert [h["version"] for h in register.champion_history(client, name)] == ["1", "3"]

    # An unchanged re-run (same training key) registers nothing new.
    _, again = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run4", "key-1")
    assert again.version == "1"

    listed = register.list_versions(cfg)
    assert [r["version"] for r in listed] == ["3", "2", "1"]
    assert listed[0]["aliases"] == [CHALLENGER, CHAMPION] and listed[1]["promoted"] == "false"

    assert register.rollback(cfg) == {"from": "3", "to": "1"}
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    with pytest.raises(RegistryError, match="first champion: there is no earlier one"):
        register.rollback(cfg)
    done = register.promote(cfg, "2")
    assert done == {"version": "2", "previous": "1", "gate": done["gate"]} and done["gate"].startswith("kept as challenger")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert register.rollback(cfg)["to"] == "1"
    with pytest.raises(RegistryError, match="has no version 9; versions: 3, 2, 1"):
        register.promote(cfg, "9")


def test_models_cli(registry_cfg, tiny_model_dir, adapters, tmp_path, capsys) -> None:
    from flows.cli import main

    cfg, train, tests = registry_cfg
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"data": {"train": "x.jsonl"}, "register": {"model_name": "regtest-model"}}))
    assert main(["models", "list", "--config", str(config)]) == 2
    assert "no registered model 'regtest-model'" in capsys.readouterr().out
    _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    _evaluate_and_register(cfg.model_copy(update={"register_": cfg.register_.model_copy(update={"champion_margin": -1.0})}),
                           train, tests, tiny_model_dir, adapters[1], tmp_path / "run2", "key-2")
    assert main(["models", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "regtest-model" in out and "champions: 1" in out
    assert main(["models", "rollback", "--config", str(config)]) == 0
    assert "rolled back from version 2 to version 1" in capsys.readouterr().out
    assert main(["models", "promote", "2", "--config", str(config)]) == 0
    assert "champion is now version 2 (was 1)" in capsys.readouterr().out
    assert main(["models", "promote", "--config", str(config)]) == 2


# ---------------------------------------------------------------------------------------------------------------
# A sabotaged fine-tune is never promoted (real base model)


def _topic_rows() -> tuple[list[dict], list[dict]]:
    """Classification on the demo's facts: the topic (hours, rental, repair) of a customer question."""
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "examples" / "make_demo_data.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    train, test = [], []
    for fact in demo.FACTS:
        topic = fact["key"].split("_")[0]
        if topic not in ("hours", "rental", "repair"):
            continue
        for i, question in enumerate(fact["train"]):
            train.append({"id": f"{fact['key']}-{i}", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": topic}], "label": topic})
        test.append({"id": f"{fact['key']}-test", "messages": [{"role": "user", "content": fact["test"]}, {"role": "assistant", "content": topic}], "label": topic})
    return train, test


@pytest.mark.slow
def test_sabotaged_finetune_is_never_promoted(real_base_model, tmp_path) -> None:
    """The same fine-tune at its learning rate and at 100x: the first passes the gate, the sabotaged one never does."""
    from tasks.train import train_adapter

    train, test = _topic_rows()
    general = load_records(REPO / "examples/probe/general.jsonl").records
    probe, replay = general[:16], general[16:]  # forgetting is measured on rows the replay mix never saw
    decisions = {}
    for label, lr in (("normal", 1e-3), ("sabotaged", 1e-1)):
        cfg = FewtuneConfig(
            data={"train": "-"},
            model={"max_length": 64},
            train={"learning_rate": lr, "epochs": 2, "batch_size": 8, "lora_top_layers": 4, "evals_per_epoch": 1},
            evaluate={"max_new_tokens": 4, "batch_size": 16, "primary_metric": "accuracy", "memorization_rows": 0, "probe_generate": False},
        )
        trained = train_adapter(train, cfg, real_base_model.path, tmp_path / label, replay=replay)
        evaluation = evaluate_models(test, probe, cfg, real_base_model.path, trained.adapter_path, tmp_path / f"{label}-eval", train_records=train)
        decisions[label] = (gate_decision(evaluation.to_dict(), cfg, None), evaluation)
    normal, sabotaged = decisions["normal"], decisions["sabotaged"]
    assert normal[0].promoted, normal[0].decision
    assert not sabotaged[0].promoted, sabotaged[0].decision
    failed = {c.name for c in sabotaged[0].criteria if not c.passed}
    assert failed & {"task_gain", "forgetting"}
    assert sabotaged[1].tuned["probe_ppl"] > normal[1].tuned["probe_ppl"] or math.isnan(sabotaged[1].tuned["probe_ppl"])
