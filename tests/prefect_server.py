"""A real Prefect server on 127.0.0.1 for integration tests and benchmarks, and the processes around it.

`LocalPrefectServer` runs `prefect server start` on a free port with its own PREFECT_HOME and SQLite database,
waits for `/api/health`, and stops it by process group (never by name). `start_process` / `stop_process` do the
same for `fewtune serve`, `fewtune webhook` and `prefect worker`; stop those before the server. `Api` reads what
the tests check (deployments, flow runs, logs, events) over the REST API.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def start_process(args: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start a command in its own process group, output to `log_path`."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group (then SIGKILL after `timeout`)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class LocalPrefectServer:
    def __init__(self, home: Path, port: int | None = None):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = self.home / "server.log"
        self.proc: subprocess.Popen | None = None

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        )
        return env

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for processes that talk to this server (serve, workers, the webhook, CLI calls)."""
        env = self._base_env()
        env.update(
            PREFECT_API_URL=self.url,
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_RUNNER_POLL_FREQUENCY="2",
        )
        env.update(extra)
        return env

    def start(self, timeout: float = 180) -> "LocalPrefectServer":
        env = self._base_env()
        env.update(
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            PREFECT_UI_ENABLED="false",
        )
        args = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = start_process(args, env, self.log_path)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{self.log_path.read_text()[-3000:]}")
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200

        wait_until(healthy, timeout, f"the Prefect server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Api:
    """The few REST calls the tests make."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def deployment(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, deployment_id: str, states: list[str] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        if states:
            body["flow_runs"] = {"state": {"type": {"any_": states}}}
        r = self.http.post("/flow_runs/filter", json=body)
        r.raise_for_status()
        return r.json()

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        r = self.http.get(f"/flow_runs/{flow_run_id}")
        r.raise_for_status()
        return r.json()

    def logs(self, flow_run_id: str) -> list[str]:
        r = self.http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        r.raise_for_status()
        return [entry["message"] for entry in r.json()]

    def events(self, name: str, resource_id: str | None = None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"event": {"name": [name]}}
        if resource_id:
            query["resource"] = {"id": [resource_id]}
        r = self.http.post("/events/filter", json={"filter": query, "limit": 50})
        r.raise_for_status()
        return r.json()["events"]

    def wait_for_final(self, flow_run_id: str, timeout: float) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            run = self.flow_run(flow_run_id)
            return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        return wait_until(final, timeout, f"flow run {flow_run_id} to finish", interval=2)
