"""Run folders (`flows.run_folder.start`): an automatic name is never shared, a name set with `run.name` is reused.

Two runs of one config that start in the same second get the same automatic name (`<config name>-<UTC second>`);
each must still get its own folder, whether they start one after the other, from threads or from processes.
"""

from __future__ import annotations

import multiprocessing
import threading

import yaml

from flows.run_folder import start
from tasks.config import load_config

NAME = "demo-20260501-020000"  # what `run_name_for` gives two runs started in the same second


def _config(tmp_path, *overrides: str):
    return load_config(None, [f"run.runs_dir={tmp_path / 'runs'}", *overrides])


def test_two_runs_with_the_same_automatic_name_get_two_folders(tmp_path):
    cfg = _config(tmp_path)
    first, second = start(cfg, NAME), start(cfg, NAME)
    assert (first.name, second.name) == (NAME, f"{NAME}-2")
    assert first.dir != second.dir and first.dir.parent == second.dir.parent == (tmp_path / "runs").resolve()
    for run in (first, second):
        assert yaml.safe_load((run.dir / "config.yaml").read_text())["name"] == cfg.name
    assert start(cfg, NAME).name == f"{NAME}-3"


def test_concurrent_starts_from_threads_get_distinct_folders(tmp_path):
    cfg, barrier, names = _config(tmp_path), threading.Barrier(8), []

    def run() -> None:
        barrier.wait()
        names.append(start(cfg, NAME).name)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == sorted([NAME] + [f"{NAME}-{n}" for n in range(2, 9)])


def _start_in_process(runs_dir: str, barrier, out) -> None:
    barrier.wait()
    out.put(start(load_config(None, [f"run.runs_dir={runs_dir}"]), NAME).name)


def test_concurrent_starts_from_processes_get_distinct_folders(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and locks
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start_in_process, args=(str(tmp_path / "runs"), barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    names = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(names) == sorted([NAME, f"{NAME}-2", f"{NAME}-3", f"{NAME}-4"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)


def test_a_run_name_set_by_the_user_is_reused(tmp_path):
    cfg = _config(tmp_path, "run.name=nightly-champion")
    first = start(cfg, "nightly-champion")
    (first.dir / "notes.txt").write_text("kept")
    second = start(cfg, "nightly-champion")
    assert second == first and (second.dir / "notes.txt").read_text() == "kept"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["nightly-champion"]
