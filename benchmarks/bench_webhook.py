"""Load test of `fewtune webhook` on loopback: a steady stream of signed deliveries with duplicates mixed in.

    .venv/bin/python benchmarks/bench_webhook.py [--rate 200] [--seconds 10] [--duplicates 0.3]

Starts a real Prefect server and `fewtune webhook` on 127.0.0.1 (both stopped at the end, by pid), sends
`rate * seconds` requests at a fixed rate, all announcing the same dataset: fresh deliveries, exact replays of an
earlier request (same headers) and sender retries (same delivery id, new timestamp and signature). Prints the
answers by status, latency percentiles, the achieved rate, and how many `fewtune.dataset.landed` events reached
the Prefect server. Expected: every fresh delivery answered (one 202 `accepted`, the rest 200 `unchanged`), every
duplicate 409, no error, exactly one event. `run_load` is also used by tests/test_deployments.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.webhook import PATH, signed_headers  # noqa: E402

CONNECTIONS = 32  # concurrent connections of the load generator


@dataclass
class LoadReport:
    sent: int
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count; kind: fresh | replay | retry
    answers: dict[str, list[int]] = field(default_factory=dict)  # delivery id -> statuses of its requests
    errors: list[str] = field(default_factory=list)  # requests that failed at the transport level 3 times
    transport_retries: int = 0  # requests re-sent after a transport error, as webhook senders do
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fresh(self) -> int:
        return len(self.answers)

    @property
    def accepted(self) -> int:
        return sum(codes.count(202) for codes in self.answers.values())

    def lost(self, recorded: set[str]) -> list[str]:
        """Distinct deliveries the receiver has no record of (`recorded`: the ids in its state database)."""
        return sorted(set(self.answers) - recorded)

    @property
    def not_collapsed(self) -> list[str]:
        """Deliveries answered 2xx more than once, or with an answer other than 2xx / 409."""
        return [
            d
            for d, codes in self.answers.items()
            if sum(c in (200, 202) for c in codes) > 1 or any(c not in (200, 202, 409) for c in codes)
        ]

    def lines(self) -> list[str]:
        lat = sorted(self.latencies_ms)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
        out = [
            f"sent {self.sent} requests in {self.seconds:.1f} s ({self.sent / self.seconds:.0f} req/s); "
            f"{self.fresh} distinct deliveries",
            f"latency ms (on a connection): p50 {pct(0.5):.1f}, p95 {pct(0.95):.1f}, p99 {pct(0.99):.1f}, max {lat[-1] if lat else 0:.1f}, "
            f"mean {statistics.fmean(lat) if lat else 0:.1f}",
        ]
        for (kind, status), n in sorted(self.statuses.items()):
            out.append(f"  {kind:6s} -> {status}: {n}")
        out.append(
            f"transport errors retried by the sender: {self.transport_retries}; "
            f"requests failed after 3 attempts: {len(self.errors)}"
        )
        out.append(
            f"accepted (202): {self.accepted} (expected 1); "
            f"deliveries answered 2xx more than once or not 2xx/409: {len(self.not_collapsed)} (expected 0)"
        )
        return out


def recorded_deliveries(state_db: str | Path) -> set[str]:
    """Delivery ids the receiver has recorded (read-only look at its SQLite state)."""
    import sqlite3

    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT delivery_id FROM deliveries")}


def _body(delivery_id: str, dataset_uri: str) -> bytes:
    return json.dumps({"delivery_id": delivery_id, "dataset_uri": dataset_uri}).encode()


async def _run_load(url: str, secret: str, dataset_uri: str, rate: float, seconds: float, duplicates: float, seed: int) -> LoadReport:
    rng = random.Random(seed)
    total = int(rate * seconds)
    plan: list[tuple[str, str, bytes, dict[str, str] | None]] = []
    sent_before: list[tuple[str, bytes, dict[str, str]]] = []
    for _ in range(total):
        if sent_before and rng.random() < duplicates:
            delivery, body, headers = rng.choice(sent_before)
            if rng.random() < 0.5:
                plan.append(("replay", delivery, body, headers))  # the same request again
            else:
                plan.append(("retry", delivery, body, None))  # the sender re-signs at send time
            continue
        delivery = str(uuid.UUID(int=rng.getrandbits(128)))
        body = _body(delivery, dataset_uri)
        headers = signed_headers(secret, body)
        plan.append(("fresh", delivery, body, headers))
        sent_before.append((delivery, body, headers))
    report = LoadReport(sent=total, answers={d: [] for d, _, _ in sent_before})
    # Idle connections are dropped by the client before the server's keep-alive timeout (5 s) can race a request.
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=1.0)
    # Requests wait for a free connection here, not in the HTTP client's pool (whose queue handling is slow).
    slots = asyncio.Semaphore(CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        start = time.perf_counter()

        async def send(i: int, kind: str, delivery: str, body: bytes, headers: dict[str, str] | None) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            for attempt in range(3):
                try:
                    async with slots:
                        t0 = time.perf_counter()
                        r = await client.post(PATH, content=body, headers=headers or signed_headers(secret, body))
                    break
                except httpx.TransportError as exc:
                    if attempt == 2:
                        report.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                        return
                    report.transport_retries += 1
                    headers = None  # a sender's retry signs again
            report.latencies_ms.append((time.perf_counter() - t0) * 1000)
            report.statuses[(kind, r.status_code)] += 1
            report.answers[delivery].append(r.status_code)

        await asyncio.gather(*(send(i, *entry) for i, entry in enumerate(plan)))
        report.seconds = time.perf_counter() - start
    return report


def run_load(url: str, secret: str, dataset_uri: str, rate: float = 200, seconds: float = 10, duplicates: float = 0.3, seed: int = 0) -> LoadReport:
    """Send `rate * seconds` signed deliveries of `dataset_uri` to the receiver at `url`; share `duplicates` repeat."""
    return asyncio.run(_run_load(url, secret, dataset_uri, rate, seconds, duplicates, seed))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10, help="length of the burst")
    parser.add_argument("--duplicates", type=float, default=0.3, help="share of requests that repeat a delivery")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and receiver on `kill`, too

    sys.path.insert(0, str(REPO / "tests"))
    import yaml

    from prefect_server import Api, LocalPrefectServer, free_port, start_process, stop_process, wait_until

    work = Path(tempfile.mkdtemp(prefix="fewtune-bench-webhook-"))
    landing = work / "landing"
    landing.mkdir()
    dataset = landing / "rows.jsonl"
    dataset.write_text((REPO / "examples/support/train.jsonl").read_text())
    port = free_port()
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"train": str(dataset)},
                "webhook": {"allowed_uris": [str(landing)], "port": port, "state_db": str(work / "webhook.sqlite")},
            }
        )
    )
    secret = uuid.uuid4().hex
    server = LocalPrefectServer(work / "prefect").start()
    hook = None
    try:
        env = server.env(FEWTUNE_WEBHOOK_SECRET=secret, FEWTUNE_HOME=str(work / "home"))
        hook = start_process([sys.executable, "-m", "flows.cli", "webhook", "--config", str(config)], env, work / "webhook.log", cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the webhook")
        for _ in range(20):  # warm-up: unsigned requests (401) run the code paths without side effects
            httpx.post(f"{base}{PATH}", content=b"{}")
        time.sleep(5)
        report = run_load(base, secret, str(dataset), args.rate, args.seconds, args.duplicates)
        print("\n".join(report.lines()))
        lost = report.lost(recorded_deliveries(work / "webhook.sqlite"))
        print(f"distinct deliveries the receiver has no record of: {len(lost)} (expected 0)")
        api = Api(server.url)
        time.sleep(3)  # let the event reach the server
        events = api.events("fewtune.dataset.landed")
        print(f"fewtune.dataset.landed events at the Prefect server: {len(events)} (expected 1)")
        print(f"secret in the receiver's log: {secret in (work / 'webhook.log').read_text()} (expected False)")
    finally:
        if hook is not None:
            stop_process(hook)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
