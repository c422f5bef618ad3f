"""Registered versions are created whole and never duplicated: a registration killed (SIGKILL) at any point is
finished by the next run on the same inputs, a version an interrupted earlier release left without its gate decision
is marked unfinished and never aliased, and two runs registering the same inputs at once (one SQLite registry, or a
real `mlflow server`) leave one version that both return.

Real `register_model` on real tiny LoRA adapters; registrations that are killed or race run in their own processes
(`register_helpers.py`), the kill injected by patching the code in that process only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from register_helpers import config, evaluation, make_adapter, register, start_child, start_mlflow_server, wait_child

from tasks import register as registry
from tasks.common.registry import CHALLENGER, CHAMPION, RegistryError
from tasks.register.versions import COMPLETE, INCOMPLETE, PENDING, REGISTRATION

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "versions-model"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, folder / f"adapter{seed}", seed) for seed in (1, 2)]


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEWTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def state(uri: str) -> dict[str, dict]:
    """Every live version of the model: aliases, how far its registration got, what its gate said, its run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for v in client.search_model_versions(f"name = '{NAME}'"):
        full = client.get_model_version(NAME, v.version)
        out[str(full.version)] = {"aliases": sorted(full.aliases or []), "registration": full.tags.get(REGISTRATION),
                                  "promoted": full.tags.get("promoted"), "decision_key": full.tags.get("decision_key"),
                                  "run_id": full.run_id}
    return out


def champion_only_where_the_gate_promoted(now: dict[str, dict]) -> None:
    for number, v in now.items():
        if CHAMPION in v["aliases"]:
            assert v["promoted"] == "true", f"champion on version {number}, whose gate did not promote it: {now}"
        if v["aliases"]:
            assert v["registration"] in (PENDING, COMPLETE, None), now


@pytest.mark.parametrize("gate", ["promoted", "not_promoted"])
@pytest.mark.parametrize("kill_at", ["logged", "created", "aliased"])
def test_a_registration_killed_at_any_point_is_finished_by_the_next_run(kill_at, gate, home, tiny_model_dir, adapters,
                                                                        tmp_path) -> None:
    """Champion version 1 exists; a second decision (promoted over it, or failing its gate on task gain) is killed
    in its own process after the model was logged, after its version was created, or after its first alias moved.
    The same inputs registered again: one version for the decision, the aliases its gate decided, complete."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    base = str(tiny_model_dir)
    first = register(config(uri), evaluation(tmp_path / "ev1", 0.5), base, adapters[0], "key-1")
    assert (first.version, first.aliases) == ("1", [CHALLENGER, CHAMPION])

    promoted = gate == "promoted"
    cfg = config(uri) if promoted else config(uri, min_gain=5.0)
    ev = evaluation(tmp_path / "ev2", 0.9)  # beats champion 1 on every row; only min_gain=5 can stop it
    job = {"cfg": cfg, "evaluation": ev, "base": base, "adapter": adapters[1], "train_key": "key-2", "kill_at": kill_at}
    assert wait_child(start_child(job, tmp_path / "killed", home), tmp_path / "killed") is None, "it was not killed"

    left = state(uri)
    champion_only_where_the_gate_promoted(left)
    assert left["1"]["aliases"] == [CHALLENGER, CHAMPION] or kill_at == "aliased"
    if kill_at == "logged":
        assert set(left) == {"1"}
    else:  # created whole, with its decision: only the aliases may be missing
        assert set(left) == {"1", "2"} and left["2"]["registration"] == PENDING and left["2"]["decision_key"]
        assert left["2"]["aliases"] == ([CHALLENGER] if kill_at == "aliased" else [])

    again = register(cfg, ev, base, adapters[1], "key-2")
    want = [CHALLENGER, CHAMPION] if promoted else [CHALLENGER]
    assert (again.version, again.promoted, again.aliases) == ("2", promoted, want), again.decision
    assert again.champion_before == "1"
    if kill_at != "logged":  # the killed run's version was finished, not registered again
        assert again.run_id == left["2"]["run_id"]
    now = state(uri)
    champion_only_where_the_gate_promoted(now)
    assert set(now) == {"1", "2"}
    assert now["2"]["aliases"] == want and now["2"]["registration"] == COMPLETE
    assert now["1"]["aliases"] == ([] if promoted else [CHAMPION])
    client = MlflowClient(uri)
    assert len(client.search_model_versions(f"name = '{NAME}' and tags.decision_key = '{now['2']['decision_key']}'")) == 1
    assert [h["version"] for h in registry.champion_history(client, NAME)] == (["1", "2"] if promoted else ["1"])
    # A third run on the same inputs changes nothing.
    assert register(cfg, ev, base, adapters[1], "key-2").aliases == want and state(uri) == now


def _earlier_release_version(tags: dict[str, str], run_tags: dict[str, str]) -> str:
    """A version registered the way earlier releases did: the model registered with the run, then tags one by one."""
    import mlflow
    from mlflow import MlflowClient
    from register_helpers import echo_model

    with mlflow.start_run(run_name="earlier"):
        mlflow.set_tags(run_tags)
        info = mlflow.pyfunc.log_model(name="model", python_model=echo_model(), registered_model_name=NAME, pip_requirements=[])
    version = str(info.registered_model_version)
    for key, value in tags.items():
        MlflowClient().set_model_version_tag(NAME, version, key, value)
    return version


def test_a_version_an_interrupted_earlier_release_left_is_marked_unfinished(home, tiny_model_dir, adapters, tmp_path,
                                                                           capsys, monkeypatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import common, main

    monkeypatch.setattr(common.console, "width", 240)  # the table's cells whole, not cut to a terminal's width

    uri = f"sqlite:///{home / 'mlflow.db'}"
    cfg = config(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("earlier")
    gate_tag = {"fewtune.gate": "promoted: every criterion passed"}
    whole = _earlier_release_version({"train_key": "old-1", "gate": "promoted: every criterion passed", "promoted": "true",
                                      "base_model": "smollm2-135m-instruct"}, gate_tag)
    cut = _earlier_release_version({"train_key": "old-2", "data_train_hash": "t"}, gate_tag)  # killed before its gate tags
    by_hand = _earlier_release_version({}, {})  # not a fewtune run: none of fewtune's business
    assert (whole, cut, by_hand) == ("1", "2", "3")

    # Refused even before a registration marks it.
    with pytest.raises(RegistryError, match=f"{NAME} version 2 is an unfinished registration .* cannot be promoted"):
        registry.promote(cfg, "2")

    reg = register(cfg, evaluation(tmp_path / "ev", 0.5), str(tiny_model_dir), adapters[0], "key-1")
    assert (reg.version, reg.aliases, reg.champion_before) == ("4", [CHALLENGER, CHAMPION], None)
    now = state(uri)
    assert {n: v["registration"] for n, v in now.items()} == {"1": None, "2": INCOMPLETE, "3": None, "4": COMPLETE}
    assert "interrupted before its gate decision" in MlflowClient(uri).get_model_version(NAME, "2").tags["registration_note"]
    listed = {r["version"]: r for r in registry.list_versions(cfg)}
    assert listed["2"]["promoted"] == "unfinished" and "registration interrupted" in listed["2"]["gate"]
    assert listed["1"]["promoted"] == "true" and listed["3"]["promoted"] == "" and listed["4"]["promoted"] == "true"

    with pytest.raises(RegistryError, match="version 2 is an unfinished registration"):
        registry.promote(cfg, "2")
    assert registry.promote(cfg, "1")["version"] == "1"  # a whole version of an earlier release is usable
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"data": {"train": "x.jsonl"}, "register": {"model_name": NAME, "tracking_uri": uri}}))
    capsys.readouterr()
    assert main(["models", "list", "--config", str(config_file)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip("│ ").startswith("2 "))
    assert "unfinished" in row
    assert main(["models", "promote", "2", "--config", str(config_file)]) == 2
    assert "unfinished registration" in capsys.readouterr().out
    # Another registration: version 2 still never gets an alias.
    register(cfg, evaluation(tmp_path / "ev2", 0.5), str(tiny_model_dir), adapters[1], "key-2")
    assert state(uri)["2"]["aliases"] == [] and state(uri)["2"]["registration"] == INCOMPLETE


def _race(uri: str, home: Path, tiny_model_dir, adapter: str, tmp_path: Path, at_create: bool) -> list[dict]:
    """Two processes register the same inputs: both start registering together (`at_create`: both have logged
    their model and decided, and create their versions together)."""
    ev = evaluation(tmp_path / "ev", 0.5)
    barrier = str(tmp_path / "barrier")
    jobs = [{"cfg": config(uri), "evaluation": ev, "base": str(tiny_model_dir), "adapter": adapter, "train_key": "key-1",
             "me": me, "parties": 2, ("barrier_at_create" if at_create else "barrier"): barrier} for me in ("a", "b")]
    procs = [(start_child(job, tmp_path / job["me"], home), tmp_path / job["me"]) for job in jobs]
    return [wait_child(proc, folder) for proc, folder in procs]


def test_two_processes_registering_the_same_inputs_on_one_sqlite_registry(home, tiny_model_dir, adapters, tmp_path) -> None:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    results = _race(uri, home, tiny_model_dir, adapters[0], tmp_path, at_create=False)
    assert [(r["version"], r["aliases"], r["promoted"]) for r in results] == [("1", [CHALLENGER, CHAMPION], True)] * 2
    assert results[0]["run_id"] == results[1]["run_id"]
    logs = [(tmp_path / me / "child.log").read_text() for me in ("a", "b")]
    assert sum("another fewtune run is registering" in log for log in logs) == 1, logs  # one waited for the other
    now = state(uri)
    assert list(now) == ["1"] and now["1"]["registration"] == COMPLETE and now["1"]["aliases"] == [CHALLENGER, CHAMPION]


def test_two_processes_registering_the_same_inputs_through_a_tracking_server(home, tiny_model_dir, adapters,
                                                                             tmp_path) -> None:
    """Both create a version of the same decision at the same moment: the lower number stands, the other run deletes
    its version (and its run) before any alias touches it, and returns the survivor. Artifacts go to the server's
    artifact store, not to a folder on the registering machine."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from prefect_server import stop_process

    server = tmp_path / "server"
    server.mkdir()
    proc, url = start_mlflow_server(server, tmp_path / "server.log")
    try:
        results = _race(url, home, tiny_model_dir, adapters[0], tmp_path, at_create=True)
        now = state(url)
        client = MlflowClient(url)
        runs = client.search_runs([results[0]["experiment_id"]], run_view_type=ViewType.ALL)
    finally:
        stop_process(proc)
    assert [(r["version"], r["aliases"], r["run_id"]) for r in results] == [("1", [CHALLENGER, CHAMPION], now["1"]["run_id"])] * 2
    assert list(now) == ["1"] and now["1"]["registration"] == COMPLETE and now["1"]["aliases"] == [CHALLENGER, CHAMPION]
    logs = "".join((tmp_path / me / "child.log").read_text() for me in ("a", "b"))
    assert "holds the same decision (registered at the same time): deleting version 2" in logs
    kept = {r.info.run_id: r for r in runs if r.info.lifecycle_stage == "active"}
    lost = [r for r in runs if r.info.lifecycle_stage == "deleted"]
    assert list(kept) == [now["1"]["run_id"]] and len(lost) == 1
    assert lost[0].data.tags["fewtune.duplicate_of"] == f"{NAME}/1"
    artifact_uri = kept[now["1"]["run_id"]].info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    logged = {p.name for p in (server / "artifacts").rglob("*")}
    assert {"MLmodel", "adapter_model.safetensors", "predictions.jsonl"} <= logged
    assert not (home / "mlartifacts").exists()
