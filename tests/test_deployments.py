"""Deployments against a real `prefect server start` on 127.0.0.1 (started and stopped by the test session, by pid).

- `fewtune serve`: the nightly cron creates scheduled runs at 02:00 in its time zone; a burst of signed webhook
  deliveries (duplicates mixed in) collapses into one `fewtune.dataset.landed` event, whose trigger starts one
  flow run that completes on the payload's dataset; then `prefect deployment run 'finetune/nightly' --param ...`
  on the same data retrains nothing and says so.
- `deployments/prefect.yaml` + a process work pool and worker (`slow`): the CLI runs the flow on new data, then
  again on unchanged data.
- `run.task_runner: dask`: score and augment run as shard tasks on a local Dask cluster, with the same results.

All runs use a tiny in-process model and a slice of the demo data, so each takes seconds to a minute.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from tasks.common.records import read_jsonl, write_jsonl

from prefect_server import Api, free_port, start_process, stop_process, wait_until

REPO = Path(__file__).resolve().parent.parent
SECRET = "deployments-test-" + uuid.uuid4().hex
RUN_TIMEOUT = 420  # seconds a tiny flow run may take on a busy 2-core machine
sys.path.insert(0, str(REPO / "benchmarks"))


def _write_config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    examples = REPO / "examples"
    train = read_jsonl(examples / "support/train.jsonl")
    write_jsonl(tmp_path / "train.jsonl", train[:48])
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(examples / "support/test.jsonl")[:8])
    write_jsonl(tmp_path / "probe.jsonl", read_jsonl(examples / "probe/general.jsonl")[:6])
    landing = tmp_path / "landing"
    landing.mkdir()
    write_jsonl(landing / "a.jsonl", train[48:96])
    write_jsonl(landing / "b.jsonl", train[96:144])
    cfg = {
        "name": "opstest",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "probe": "probe.jsonl"},
        "model": {"base": str(model_dir), "max_length": 96},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "evals_per_epoch": 2},
        "evaluate": {"max_new_tokens": 8, "batch_size": 8, "max_examples": 4, "memorization_rows": 0, "probe_max_rows": 4, "probe_max_new_tokens": 4},
        "register": {"model_name": f"opstest-{uuid.uuid4().hex[:8]}", "min_gain": -1.0},
        "run": {"runs_dir": str(tmp_path / "runs")},
        "serve": {"timezone": "Europe/Berlin"},
        "webhook": {"allowed_uris": [str(landing)], "port": free_port(), "state_db": str(tmp_path / "webhook.sqlite")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _summary_for(runs_dir: Path, dataset: Path) -> dict:
    for path in runs_dir.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["validate"]["files"]["train"]["path"] == str(dataset):
            return summary
    raise AssertionError(f"no run summary in {runs_dir} trained on {dataset}")


def _assert_nightly_schedule(api: Api, cron: str, tz: str) -> None:
    nightly = api.deployment("finetune/nightly")
    (schedule,) = [s["schedule"] for s in nightly["schedules"]]
    assert schedule["cron"] == cron and schedule["timezone"] == tz
    scheduled = wait_until(lambda: api.flow_runs(nightly["id"], ["SCHEDULED"]), 120, "the scheduler to create nightly runs")
    for run in scheduled:
        local = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo(tz))
        assert (local.hour, local.minute) == (2, 0), run["expected_start_time"]


def _duration_s(run: dict) -> float:
    return (datetime.fromisoformat(run["end_time"]) - datetime.fromisoformat(run["start_time"])).total_seconds()


def test_serve_schedules_nightly_and_signed_webhook_burst_starts_one_run(tmp_path, tiny_model_dir, local_prefect_server):
    from bench_webhook import recorded_deliveries, run_load

    config = _write_config(tmp_path, tiny_model_dir)
    cfg = yaml.safe_load(config.read_text())
    env = local_prefect_server.env(FEWTUNE_WEBHOOK_SECRET=SECRET)
    api = Api(local_prefect_server.url)
    serve = start_process([sys.executable, "-m", "flows.cli", "serve", "--config", str(config)], env, tmp_path / "serve.log", cwd=tmp_path)
    hook = start_process([sys.executable, "-m", "flows.cli", "webhook", "--config", str(config)], env, tmp_path / "webhook.log", cwd=tmp_path)
    try:
        landed = wait_until(lambda: api.deployment("finetune/dataset-landed"), 180, "fewtune serve to register its deployments")
        _assert_nightly_schedule(api, "0 2 * * *", "Europe/Berlin")
        base = f"http://127.0.0.1:{cfg['webhook']['port']}"
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 120, "fewtune webhook to listen")
        time.sleep(3)  # the serve runner polls every 2 s; let it settle before the burst

        dataset = tmp_path / "landing" / "a.jsonl"
        report = run_load(base, SECRET, str(dataset), rate=200, seconds=10, duplicates=0.3)
        print("\n".join(report.lines()))
        assert report.errors == [], "every request is answered (senders retry transport errors, as webhooks do)"
        assert report.lost(recorded_deliveries(cfg["webhook"]["state_db"])) == [], "every distinct delivery is recorded"
        assert report.not_collapsed == [], "each delivery is taken once; its repeats get 409"
        assert report.accepted == 1, "one dataset content: one accepted delivery"

        (run,) = wait_until(lambda: api.flow_runs(landed["id"]), 60, "the trigger to start a flow run")
        run = api.wait_for_final(run["id"], RUN_TIMEOUT)
        assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert run["parameters"]["dataset"] == str(dataset)
        assert run["parameters"]["config_path"] == str(config)
        summary = _summary_for(tmp_path / "runs", dataset)
        assert summary["validate"]["files"]["train"]["rows_kept"] == 48
        assert summary["unchanged"] is False and summary["register"]["version"] == "1"
        # Only one run for the whole burst (the trigger fires on events, and only one was emitted).
        time.sleep(3)
        assert len(api.flow_runs(landed["id"])) == 1

        # ML ops re-run the nightly deployment by hand on the same data: nothing is retrained, and the log says so.
        train_result = next((tmp_path / "runs" / ".cache").glob("train-*/result.json"))
        stamp = train_result.stat().st_mtime_ns
        out = _prefect(["deployment", "run", "finetune/nightly", "--param", f"dataset={dataset}"], env)
        nightly = api.wait_for_final(re.search(r"UUID: ([0-9a-f-]{36})", out).group(1), RUN_TIMEOUT)
        assert nightly["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert nightly["parameters"]["dataset"] == str(dataset)
        assert any(line.startswith("unchanged data: nothing to retrain") for line in api.logs(nightly["id"]))
        assert not any("unchanged data" in line for line in api.logs(run["id"]))
        assert train_result.stat().st_mtime_ns == stamp, "the unchanged run did not retrain"
        print(f"landed run {_duration_s(run):.1f} s, nightly run on the same data {_duration_s(nightly):.1f} s")
    finally:
        stop_process(hook)
        stop_process(serve)
    assert SECRET not in (tmp_path / "webhook.log").read_text()


def _prefect(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow  # a work pool, a worker and two flow runs: several minutes on a 2-core machine
def test_prefect_yaml_worker_and_cli_deployment_run_skip_unchanged_data(tmp_path, tiny_model_dir, local_prefect_server):
    config = _write_config(tmp_path, tiny_model_dir)
    env = local_prefect_server.env()
    api = Api(local_prefect_server.url)
    _prefect(["work-pool", "create", "fewtune-process", "--type", "process", "--overwrite"], env)
    _prefect(["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
    _assert_nightly_schedule(api, "0 2 * * *", "Europe/Berlin")
    landed = api.deployment("finetune/dataset-landed")
    worker = start_process([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "fewtune-process"], env, tmp_path / "worker.log", cwd=tmp_path)
    dataset = tmp_path / "landing" / "b.jsonl"
    params = ["--param", f"config_path={config}", "--param", f"dataset={dataset}"]
    try:
        runs = []
        for _ in range(2):
            out = _prefect(["deployment", "run", "finetune/nightly", *params], env)
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
            runs.append(api.wait_for_final(run_id, RUN_TIMEOUT))
            assert runs[-1]["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
            if len(runs) == 1:
                train_result = next((tmp_path / "runs" / ".cache").glob("train-*/result.json"))
                stamp = train_result.stat().st_mtime_ns
        first, second = runs
        assert first["parameters"]["dataset"] == str(dataset)
        assert not any("unchanged data" in line for line in api.logs(first["id"]))
        assert any(line.startswith("unchanged data: nothing to retrain") for line in api.logs(second["id"]))
        assert train_result.stat().st_mtime_ns == stamp, "the unchanged run did not retrain"
        print(f"first run {_duration_s(first):.1f} s, unchanged run {_duration_s(second):.1f} s "
              f"({_duration_s(second) / _duration_s(first):.0%})")
    finally:
        stop_process(worker)
        for name in ("finetune/nightly", "finetune/dataset-landed"):
            api.http.delete(f"/deployments/{api.deployment(name)['id']}")
    assert landed["id"]


def test_dask_task_runner_shards_score_and_augment(tmp_path, tiny_model_dir, local_prefect_server):
    import pandas as pd
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.finetune import finetune
    from tasks.common.models import load_base
    from tasks.score import score_records

    config = _write_config(
        tmp_path,
        tiny_model_dir,
        run={"task_runner": "dask", "dask_workers": 2, "dask_shards": 3, "name": "dask"},
        register={"enabled": False},
        evaluate={"max_examples": 2},
        model={"dtype": "float32"},  # sharded and whole scores are compared to 1e-4: fp32 on every CPU
    )
    with temporary_settings(updates={PREFECT_API_URL: local_prefect_server.url}):
        summary = finetune(config_path=str(config))
    run_dir = Path(summary["run_dir"])
    sharded = pd.read_parquet(run_dir / "scores.parquet")

    # The same rows scored in one piece give the same per-row scores, z-scores and outliers.
    train = read_jsonl(run_dir / "data" / "train.jsonl")
    cfg = yaml.safe_load(config.read_text())
    model, tokenizer = load_base(str(tiny_model_dir), cfg["model"]["dtype"])
    whole = score_records(
        train,
        model,
        tokenizer,
        max_length=cfg["model"]["max_length"],
        batch_size=16,
        outlier_z=3.5,
        out_path=tmp_path / "whole.parquet",
    )
    reference = pd.DataFrame(whole.rows)
    assert list(sharded["id"]) == list(reference["id"]) and len(sharded) == 48
    assert sharded["nll_mean"].tolist() == pytest.approx(reference["nll_mean"].tolist(), rel=1e-4)
    assert sharded["log_ppl_z"].tolist() == pytest.approx(reference["log_ppl_z"].tolist(), rel=1e-3, abs=1e-3)
    assert sharded["outlier"].tolist() == reference["outlier"].tolist()
    assert summary["score"]["rows"] == 48 and summary["augment"]["rows"] == 48
    assert "3 shards on Dask" in summary["augment"]["note"]

    # The shard tasks ran as task runs of the sharded subflow.
    api = Api(local_prefect_server.url)
    r = api.http.post("/task_runs/filter", json={"task_runs": {"name": {"like_": "score-shard"}}})
    names = [t["name"] for t in r.json()]
    assert sum(n.startswith("score-shard") for n in names) >= 3


def test_landed_dataset_uris_become_local_files(tmp_path):
    import fsspec

    from tasks.common.landing import materialize
    from tasks.common.records import DataError

    local = tmp_path / "rows.jsonl"
    local.write_text('{"prompt": "a", "completion": "b"}\n')
    assert materialize(str(local), tmp_path / "landing") == str(local)
    assert materialize(local.as_uri(), tmp_path / "landing") == str(local)

    # An object store (fsspec's in-memory one here): downloaded on every run, so new content under the key is seen.
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/landing/rows.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    first = materialize("memory://bucket/landing/rows.jsonl", tmp_path / "landing")
    assert Path(first).read_bytes() == b'{"prompt": "a", "completion": "b"}\n'
    fs.pipe("/bucket/landing/rows.jsonl", b'{"prompt": "c", "completion": "d"}\n')
    again = materialize("memory://bucket/landing/rows.jsonl", tmp_path / "landing")
    assert again == first and Path(again).read_bytes() == b'{"prompt": "c", "completion": "d"}\n'
    fs.pipe("/bucket/folder/part-0.jsonl", b"{}\n")
    folder = materialize("memory://bucket/folder/", tmp_path / "landing")
    assert (Path(folder) / "part-0.jsonl").read_bytes() == b"{}\n"

    with pytest.raises(DataError, match="no such object"):
        materialize("memory://bucket/missing.jsonl", tmp_path / "landing")
    with pytest.raises(DataError, match="pip install s3fs"):
        materialize("s3://bucket/landing/rows.jsonl", tmp_path / "landing")
