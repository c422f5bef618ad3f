"""MLflow registry round trip, the champion comparison (failing closed), the decision key that decides when a re-run
reuses a version, and `fewtune models list | promote | rollback`. The gate's own logic is in test_gate.py.

Fast tests use the tiny model and real LoRA adapters with random weights; the sabotaged fine-tune (learning rate
x100) runs on the real base model and is marked `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from gate_helpers import forgetting, memorization

from tasks import register
from tasks.common.generation import generate_answers, load_tuned, settings_from
from tasks.common.models import load_model, load_tokenizer
from tasks.common.records import load_records
from tasks.common.registry import CHALLENGER, CHAMPION, RegistryError
from tasks.config import FewtuneConfig
from tasks.evaluate import evaluate_models
from tasks.register import gate_decision, register_model
from tasks.register.gate import FORGETTING

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


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
        model={"max_length": 96, "dtype": "float32"},  # logits are compared with a direct fp32 load
        evaluate={"max_new_tokens": 6, "batch_size": 8, "bootstrap_samples": 200, "memorization_rows": 8},
        register={"model_name": "regtest-model", "min_gain": -1.0},
    )
    return cfg, train, tests


def _with(cfg: FewtuneConfig, **register_fields) -> FewtuneConfig:
    return cfg.model_copy(update={"register_": cfg.register_.model_copy(update=register_fields)})


def _evaluate(cfg, train, tests, tiny_model_dir, adapter, out: Path) -> dict:
    """A real evaluation of the adapter on the test rows (predictions with row scores: the champion comparison reads
    them). Its forgetting and memorization parts are set by hand to figures well inside the gate: random LoRA weights
    on a tiny model are not a fine-tune whose forgetting means anything, and these tests are about the registry."""
    evaluation = evaluate_models(tests, None, cfg, str(tiny_model_dir), adapter, out, train_records=train).to_dict()
    evaluation.update(forgetting=forgetting(), memorization=memorization())
    return evaluation


def _register(cfg, evaluation, tests, tiny_model_dir, adapter, out: Path, train_key: str, eval_hash: str = "evalhash"):
    return register_model(
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


def _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapter, out: Path, train_key: str, eval_hash: str = "evalhash"):
    evaluation = _evaluate(cfg, train, tests, tiny_model_dir, adapter, out)
    return evaluation, _register(cfg, evaluation, tests, tiny_model_dir, adapter, out, train_key, eval_hash)


def _criterion(reg, name: str) -> dict:
    return next(c for c in reg.gate["criteria"] if c["name"] == name)


def _champion_now(reg) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(reg.tracking_uri).get_model_version_by_alias(reg.model_name, CHAMPION).version)


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
    # The served model computes in the dtype recorded with it, the one the evaluation used.
    recorded = loaded.model_config["dtype"]
    assert recorded == evaluation["generation"]["dtype"] == loaded.unwrap_python_model().dtype == "float32"
    assert served.dtype == torch.float32
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
    assert version.tags["gate.champion"] == "not_applicable" and version.tags["champion_before"] == "none"
    assert {version.tags[f"gate.{n}"] for n in FORGETTING} == {"pass"} and len(version.tags["decision_key"]) == 16
    recorded = json.loads(version.tags["gate_json"])
    assert recorded == reg.gate and {c["status"] for c in recorded["criteria"]} == {"pass", "not_applicable"}
    run = client.get_run(reg.run_id)
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert "delta_rouge_l_low" in run.data.metrics and run.data.metrics["gate_promoted"] == 1.0
    assert run.data.metrics["gate_forgetting_kl_task_high"] == 0.5 and run.data.metrics["forgetting_kl_task"] == 0.4
    assert run.data.tags["fewtune.gate.forgetting_ppl"] == "pass" and run.data.tags["fewtune.gate.champion"] == "not_applicable"
    logged = {a.path for a in client.list_artifacts(reg.run_id)}
    assert {"evaluation.json", "gate.json", "predictions.jsonl"} <= logged
    assert client.get_experiment(reg.experiment_id).name == "fewtune-regtest"


def test_champion_comparison_history_promote_and_rollback(registry_cfg, tiny_model_dir, adapters, tmp_path) -> None:
    from mlflow import MlflowClient

    cfg, train, tests = registry_cfg
    evaluation, first = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    assert first.promoted and first.champion_before is None

    # Same adapter retrained under another key: same rows, same settings -> the champion's recorded row scores are
    # compared; equal scores (a paired interval of 0 to 0) do not beat the champion, so it stays.
    same = _register(cfg, evaluation, tests, tiny_model_dir, adapters[0], tmp_path / "run2", "key-2")
    champ = _criterion(same, "champion")
    assert (champ["value"], champ["high"], champ["status"]) == (0.0, 0.0, "fail") and "recorded row scores" in champ["detail"]
    assert not same.promoted and same.aliases == [CHALLENGER] and same.champion_before == "1"

    # Other test-set hash: the champion's registered model answers these rows again.
    _, other = _evaluate_and_register(_with(cfg, champion_margin=-1.0), train, tests, tiny_model_dir, adapters[1],
                                      tmp_path / "run3", "key-3", eval_hash="other")
    champ = _criterion(other, "champion")
    assert "re-evaluated" in champ["detail"] and champ["status"] == "pass" and other.promoted and other.champion_before == "1"

    client = MlflowClient(first.tracking_uri)
    name = cfg.register_.model_name
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "3"
    assert [h["version"] for h in register.champion_history(client, name)] == ["1", "3"]

    listed = register.list_versions(cfg)
    assert [r["version"] for r in listed] == ["3", "2", "1"]
    assert listed[0]["aliases"] == [CHALLENGER, CHAMPION] and listed[1]["promoted"] == "false"
    assert listed[1]["criteria"]["champion"] == "fail" and listed[0]["criteria"]["champion"] == "pass"

    assert register.rollback(cfg) == {"from": "3", "to": "1"}
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    with pytest.raises(RegistryError, match="first champion: there is no earlier one"):
        register.rollback(cfg)
    done = register.promote(cfg, "2")
    assert done == {"version": "2", "previous": "1", "gate": done["gate"]} and done["gate"].startswith("not promoted: failed champion")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert register.rollback(cfg)["to"] == "1"
    with pytest.raises(RegistryError, match="has no version 9; versions: 3, 2, 1"):
        register.promote(cfg, "9")


def test_a_rerun_reuses_a_version_only_when_everything_the_decision_read_is_unchanged(
        registry_cfg, tiny_model_dir, adapters, tmp_path) -> None:
    cfg, train, tests = registry_cfg
    evaluation, first = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    assert first.version == "1" and first.promoted

    # Unchanged: same training and evaluation inputs, thresholds and gate code; the champion is that version itself.
    again = _register(cfg, evaluation, tests, tiny_model_dir, adapters[0], tmp_path / "run1b", "key-1")
    assert (again.version, again.run_id, again.decision, again.gate) == ("1", first.run_id, first.decision, first.gate)

    # A changed eval file (other rows, other hash), same training key: a new version and a new decision, here against
    # champion 1 re-evaluated on the new rows.
    fewer = _evaluate(cfg, train, tests[1:], tiny_model_dir, adapters[0], tmp_path / "run2")
    changed_eval = _register(cfg, fewer, tests[1:], tiny_model_dir, adapters[0], tmp_path / "run2", "key-1", eval_hash="evalhash-2")
    assert changed_eval.version == "2" and changed_eval.champion_before == "1"
    assert "re-evaluated" in _criterion(changed_eval, "champion")["detail"] and _criterion(changed_eval, "task_gain")["value"] is not None
    assert changed_eval.decision != first.decision

    # A changed threshold, same data and evaluation: a new version decided under the new threshold.
    strict = _register(_with(cfg, max_kl_task=0.1), evaluation, tests, tiny_model_dir, adapters[0], tmp_path / "run3", "key-1")
    assert strict.version == "3" and _criterion(strict, "forgetting_kl_task")["status"] == "fail" and not strict.promoted

    # Version 2's inputs again while champion 1 is unchanged: reused. After the champion moves, decided again.
    assert _register(cfg, fewer, tests[1:], tiny_model_dir, adapters[0], tmp_path / "run4", "key-1", eval_hash="evalhash-2").version == "2"
    register.promote(cfg, "3")
    moved = _register(cfg, fewer, tests[1:], tiny_model_dir, adapters[0], tmp_path / "run5", "key-1", eval_hash="evalhash-2")
    assert moved.version == "4" and moved.champion_before == "3"


def test_champion_whose_model_is_gone_stops_promotion(registry_cfg, tiny_model_dir, adapters, tmp_path) -> None:
    """A champion whose artifacts were deleted and whose recorded predictions are for other rows: it can neither be
    read back nor answer again, so the challenger is registered but not promoted, with the reason and the fix."""
    cfg, train, tests = registry_cfg
    _, first = _evaluate_and_register(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    shutil.rmtree(Path(tmp_path / "home" / "mlartifacts"))  # the champion's model and predictions, gone from disk
    generous = _with(cfg, champion_margin=-1.0)  # any comparison at all would pass: only the failure can stop it
    evaluation, second = _evaluate_and_register(generous, train, tests, tiny_model_dir, adapters[1], tmp_path / "run2", "key-2",
                                                eval_hash="other")
    champ = _criterion(second, "champion")
    assert champ["status"] == "error" and not second.promoted and second.aliases == [CHALLENGER]
    assert f"could not re-evaluate champion version 1 of regtest-model at {first.tracking_uri}" in champ["detail"]
    assert "restore its artifacts" in champ["detail"] and second.decision.startswith("not promoted: could not measure champion")
    assert _champion_now(second) == "1"
    # A decision made while the champion could not be compared is never reused: the same inputs are decided again.
    third = _register(generous, evaluation, tests, tiny_model_dir, adapters[1], tmp_path / "run3", "key-2", eval_hash="other")
    assert third.version == "3" and _criterion(third, "champion")["status"] == "error" and third.champion_before == "1"


def test_a_registry_error_is_not_no_champion(registry_cfg, tiny_model_dir, adapters, tmp_path, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cfg, train, tests = registry_cfg
    evaluation = _evaluate(cfg, train, tests, tiny_model_dir, adapters[0], tmp_path / "run1")
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    name = cfg.register_.model_name
    key = register.generation_key(evaluation, "evalhash")
    # Genuinely no champion: no registered model, then a registered model without the alias.
    assert register.compare_with_champion(MlflowClient(uri), cfg, evaluation, tests, key) is None
    first = _register(cfg, evaluation, tests, tiny_model_dir, adapters[0], tmp_path / "run1", "key-1")
    MlflowClient(uri).delete_registered_model_alias(name, CHAMPION)
    assert register.compare_with_champion(MlflowClient(uri), cfg, evaluation, tests, key) is None
    MlflowClient(uri).set_registered_model_alias(name, CHAMPION, first.version)

    class LockedRegistry(MlflowClient):  # fault injection: the real client, whose alias lookup hits a locked database
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    found = register.compare_with_champion(LockedRegistry(uri), cfg, evaluation, tests, key)
    assert set(found) == {"error"} and f"could not read the champion of {name} at {uri}: " in found["error"]
    assert "database is locked" in found["error"] and "fix the registry" in found["error"]

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "MlflowClient", LockedRegistry)
        second = _register(_with(cfg, champion_margin=-1.0), evaluation, tests, tiny_model_dir, adapters[1], tmp_path / "run2", "key-2")
    assert second.version == "2" and not second.promoted and _criterion(second, "champion")["status"] == "error"
    assert "database is locked" in second.decision
    assert _champion_now(second) == "1"
    # Once the registry answers again, the same inputs are decided again, against champion 1.
    third = _register(_with(cfg, champion_margin=-1.0), evaluation, tests, tiny_model_dir, adapters[1], tmp_path / "run3", "key-2")
    assert third.version == "3" and _criterion(third, "champion")["status"] == "pass" and third.promoted


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
    assert "served: models:/regtest-model@champion -> version 2 (run2)" in " ".join(out.split())
    assert main(["models", "rollback", "--config", str(config)]) == 0
    assert "rolled back from version 2 to version 1" in capsys.readouterr().out
    assert main(["models", "promote", "2", "--config", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "champion is now version 2 (was 1); restart servers of models:/regtest-model@champion" in out
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
    """The same fine-tune at its learning rate and at 100x: the first learns the task, the sabotaged one is never
    promoted, and it is the task or forgetting that stops it.

    The normal run is not required to be promoted: a classifier fine-tune on one-word labels may also change how the
    model answers general questions, and that verdict belongs to the forgetting criteria, not to this test."""
    from tasks.common.general_probe import load_general_probe
    from tasks.train import train_adapter

    train, test = _topic_rows()
    decisions = {}
    for label, lr in (("normal", 1e-3), ("sabotaged", 1e-1)):
        cfg = FewtuneConfig(
            data={"train": "-"},
            model={"max_length": 64},
            train={"learning_rate": lr, "epochs": 2, "batch_size": 8, "lora_top_layers": 4, "evals_per_epoch": 1},
            evaluate={"max_new_tokens": 4, "batch_size": 16, "primary_metric": "accuracy", "memorization_rows": 0,
                      "probe_max_rows": 30, "probe_max_new_tokens": 16},
        )
        trained = train_adapter(train, cfg, real_base_model.path, tmp_path / label)  # on-policy replay, by default
        evaluation = evaluate_models(test, load_general_probe(), cfg, real_base_model.path, trained.adapter_path,
                                     tmp_path / f"{label}-eval", train_records=train).to_dict()
        decisions[label] = (gate_decision(evaluation, cfg, None), evaluation)
    normal, sabotaged = decisions["normal"], decisions["sabotaged"]

    def why(gate) -> str:
        return gate.decision + "\n" + "\n".join(f"{c.name}: {c.status}: {c.detail}" for c in gate.criteria)

    assert {c.name: c.status for c in normal[0].criteria}["task_gain"] == "pass", why(normal[0])
    assert not sabotaged[0].promoted, why(sabotaged[0])
    failed = {c.name for c in sabotaged[0].criteria if c.status in ("fail", "error")}
    assert failed & {"task_gain", *FORGETTING}, sabotaged[0].decision
    ppl = [d[1]["forgetting"]["signals"]["general_ppl"]["value"] for d in (normal, sabotaged)]
    assert ppl[1] > ppl[0] or math.isnan(ppl[1])
