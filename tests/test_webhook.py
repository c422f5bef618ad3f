"""The signed data-landing receiver: signature (and secret rotation), schema, replay store, re-triggers, and its
refusals end to end. The dataset URI, allow-list and size rules it shares with the flow are in test_landing.py.

The unit tests exercise the checks directly; events are caught by Prefect's in-memory events client.
`test_refused_requests_emit_nothing` runs `fewtune webhook` as a process against a real Prefect server and sends
every kind of bad request: each is refused with its 4xx code, and no `fewtune.dataset.landed` event reaches the
server — until a valid delivery, which emits exactly one. `test_load_starts_one_run_per_content_and_per_retrigger`
sends 500 mixed deliveries from 8 threads and counts the events that reach the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.webhook import (
    PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Claim,
    DeliveryStore,
    Receiver,
    Rejected,
    content_sha256,
    sign,
    signed_headers,
)
from tasks.config import ConfigError, load_config

from prefect_server import Api, free_port, start_process, stop_process, wait_until

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-" + "a1b2c3d4" * 4


# ----------------------------------------------------------------------------------------------------------------
# Signature


def _receiver(tmp_path: Path, allowed: list[str], **webhook) -> Receiver:
    cfg = load_config(None, [f"webhook.allowed_uris={json.dumps(allowed)}"] + [f"webhook.{k}={v}" for k, v in webhook.items()])
    return Receiver(cfg, SECRET, DeliveryStore(tmp_path / "state.sqlite", cfg.webhook.delivery_ttl_s, cfg.webhook.announce_ttl_s))


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"a": 1}'
    expected = hmac_hex(SECRET, b"1700000000." + body)
    assert sign(SECRET, 1700000000, body) == "sha256=" + expected
    headers = signed_headers(SECRET, body, timestamp=1700000000)
    assert headers[TIMESTAMP_HEADER] == "1700000000" and headers[SIGNATURE_HEADER] == "sha256=" + expected


def hmac_hex(secret: str, message: bytes) -> str:
    import hmac

    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def test_verify_refuses_missing_wrong_stale_and_future(tmp_path):
    r = _receiver(tmp_path, ["/tmp"], tolerance_s=300)
    body, now = b"{}", 1_700_000_000
    good = sign(SECRET, now, body)
    r.verify(str(now), good, body, now)  # accepted
    r.verify(str(now - 299), sign(SECRET, now - 299, body), body, now)
    cases = {
        "missing signature": (str(now), None, body),
        "missing timestamp": (None, good, body),
        "not unix seconds": ("2026-01-01", good, body),
        "wrong secret": (str(now), sign("another-secret-of-length", now, body), body),
        "body changed": (str(now), good, b'{"x": 1}'),
        "timestamp changed": (str(now + 1), good, body),
        "stale": (str(now - 301), sign(SECRET, now - 301, body), body),
        "future": (str(now + 301), sign(SECRET, now + 301, body), body),
        "bare hex": (str(now), good.removeprefix("sha256="), body),
    }
    for name, (ts, sig, b) in cases.items():
        with pytest.raises(Rejected) as info:
            r.verify(ts, sig, b, now)
        assert info.value.status == 401, name


# ----------------------------------------------------------------------------------------------------------------
# Payloads and idempotency (in process, no Prefect server: only requests that must not emit are sent)


def test_payload_schema_is_strict(tmp_path):
    r = _receiver(tmp_path, [str(tmp_path)])
    bad = {
        b"not json": 400,
        b'{"delivery_id": "abcdefgh"': 400,
        b"[]": 422,
        b'{"dataset_uri": "/x"}': 422,
        b'{"delivery_id": "abcdefgh", "dataset_uri": "/x", "extra": 1}': 422,
        b'{"delivery_id": "short", "dataset_uri": "/x"}': 422,
        b'{"delivery_id": "abcdefgh; rm -rf", "dataset_uri": "/x"}': 422,
        b'{"delivery_id": 12345678, "dataset_uri": "/x"}': 422,
        b'{"delivery_id": "abcdefgh", "dataset_uri": "/x", "sha256": "XYZ"}': 422,
    }
    for body, status in bad.items():
        code, answer = r.handle(*_sig(body), body)
        assert code == status, (body, answer)
        assert answer["status"] == "rejected"
    assert r.store.counts() == {"deliveries": 0, "datasets": 0}


def _sig(body: bytes, secret: str = SECRET, timestamp: float | None = None) -> tuple[str, str]:
    h = signed_headers(secret, body, None if timestamp is None else int(timestamp))
    return h[TIMESTAMP_HEADER], h[SIGNATURE_HEADER]


def test_store_collapses_replays_and_unchanged_content_atomically(tmp_path):
    store = DeliveryStore(tmp_path / "state.sqlite", ttl_s=3600)
    now = time.time()
    assert store.claim("delivery-1", "a" * 64, "/d/1", now) == Claim("new")
    assert store.claim("delivery-1", "a" * 64, "/d/1", now) == Claim("replay")
    assert store.claim("delivery-2", "a" * 64, "/d/1-copy", now) == Claim("unchanged", "delivery-1", now, "/d/1")
    assert store.claim("delivery-3", "b" * 64, "/d/2", now) == Claim("new")
    store.release("delivery-3", "b" * 64)  # the event could not be sent: a retry must be able to succeed
    assert store.claim("delivery-3", "b" * 64, "/d/2", now) == Claim("new")
    # Old delivery ids are forgotten after the TTL (the timestamp window refuses such old requests anyway).
    assert store.claim("delivery-4", "c" * 64, "/d/3", now + 7200) == Claim("new")
    assert store.claim("delivery-1", "a" * 64, "/d/1", now + 7200).verdict == "unchanged"
    assert store.claim("delivery-5", "a" * 64, "/d/1", now + 7200).first_delivery_id == "delivery-1"
    store.close()

    # Many threads racing on the same delivery and on the same content: exactly one wins each.
    store = DeliveryStore(tmp_path / "race.sqlite", ttl_s=3600)
    verdicts: list[str] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        verdict = store.claim(f"delivery-{i % 5}", "d" * 64, "/d/4", now).verdict
        with lock:
            verdicts.append(verdict)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verdicts.count("new") == 1 and verdicts.count("unchanged") == 4 and verdicts.count("replay") == 35
    # The state survives a restart.
    store.close()
    reopened = DeliveryStore(tmp_path / "race.sqlite", ttl_s=3600)
    assert reopened.claim("delivery-0", "d" * 64, "/d/4", now).verdict == "replay"


def test_receiver_needs_secret_allow_list_and_api(tmp_path, monkeypatch):
    from deployments.webhook import load_receiver

    cfg = load_config(None, [f"webhook.allowed_uris=[{tmp_path}]", f"webhook.state_db={tmp_path / 's.sqlite'}"])
    monkeypatch.delenv("FEWTUNE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="FEWTUNE_WEBHOOK_SECRET"):
        load_receiver(cfg)
    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET", "too-short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_receiver(cfg)
    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET", SECRET)
    with pytest.raises(ConfigError, match="allowed_uris is empty"):
        load_receiver(load_config(None, []))
    assert SECRET not in repr(_receiver(tmp_path, [str(tmp_path)]))
    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET_PREVIOUS", "old-but-short")
    with pytest.raises(ConfigError, match="previous secret in FEWTUNE_WEBHOOK_SECRET_PREVIOUS is shorter than 16"):
        load_receiver(cfg)


def test_secret_rotation_accepts_the_current_and_the_previous_secret(tmp_path, monkeypatch, caplog, emitted):
    from deployments.webhook import load_receiver

    previous = "old-" + "f00dcafe" * 4
    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET_PREVIOUS", previous)
    cfg = load_config(None, [f"webhook.allowed_uris=[{tmp_path}]", f"webhook.state_db={tmp_path / 's.sqlite'}"])
    with caplog.at_level(logging.WARNING, logger="fewtune.webhook"):
        r = load_receiver(cfg)
        body, now = b"{}", int(time.time())
        assert r.verify(str(now), sign(SECRET, now, body), body, now) == 0
        assert r.verify(str(now), sign(previous, now, body), body, now) == 1
        for other in ("another-secret-of-length", previous + "x", SECRET[:-1], ""):
            with pytest.raises(Rejected) as info:
                r.verify(str(now), sign(other, now, body), body, now)
            assert info.value.status == 401, other
        (tmp_path / "rows.jsonl").write_text('{"a": 1}\n')
        body = json.dumps({"delivery_id": "rotated-1", "dataset_uri": str(tmp_path / "rows.jsonl")}).encode()
        assert r.handle(*_sig(body, previous), body)[0] == 202
    assert [e.payload["delivery_id"] for e in emitted()] == ["rotated-1"]
    assert "accepting the previous secret (FEWTUNE_WEBHOOK_SECRET_PREVIOUS)" in caplog.text
    assert "rotated-1: signed with the previous secret" in caplog.text
    assert SECRET not in caplog.text + repr(r) and previous not in caplog.text + repr(r)


@pytest.fixture
def emitted():
    """The events the receiver emits, caught by Prefect's in-memory events client (no server needed)."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    AssertingEventsClient.reset()
    EventsWorker.set_client_override(AssertingEventsClient)

    def events() -> list:
        EventsWorker.instance().wait_until_empty()
        return [event for client in AssertingEventsClient.all for event in client.events]

    # An API URL nothing listens on: the events worker's client for run context is not used, and no ephemeral
    # server is started for it.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield events
        EventsWorker.drain_all(timeout=10)
    EventsWorker.set_client_override(None)


def test_retrigger_and_announce_ttl_start_runs_on_known_content(tmp_path, emitted):
    from prefect.events.clients import AssertingEventsClient, NullEventsClient
    from prefect.events.worker import EventsWorker

    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    r, t0 = _receiver(tmp_path, [str(tmp_path)], announce_ttl_s=3600), time.time()

    def send(delivery: str, dt: float, **extra) -> tuple[int, dict]:
        body = json.dumps({"delivery_id": delivery, "dataset_uri": str(data), **extra}).encode()
        return r.handle(*_sig(body, timestamp=t0 + dt), body, now=t0 + dt)

    assert send("delivery-1", 0)[0] == 202
    # The run failed; the same content again starts nothing, and the answer says how to start a run anyway.
    code, answer = send("delivery-2", 60)
    assert code == 200 and answer["status"] == "unchanged" and answer["first_delivery_id"] == "delivery-1"
    assert '"retrigger": true' in answer["detail"] and "webhook.announce_ttl_s" in answer["detail"]
    code, answer = send("delivery-3", 120, retrigger=True)
    assert code == 202 and answer["retriggered"] and answer["previous_delivery_id"] == "delivery-1"
    assert send("delivery-3", 130, retrigger=True)[0] == 409  # a retrigger is a delivery like any other
    assert send("delivery-4", 180)[1]["first_delivery_id"] == "delivery-3"  # the retrigger is the announcement now
    # A retrigger whose event cannot be emitted (503) puts the previous announcement back; the sender's retry works.
    EventsWorker.set_client_override(NullEventsClient)
    assert send("delivery-5", 240, retrigger=True)[0] == 503
    EventsWorker.set_client_override(AssertingEventsClient)
    code, answer = send("delivery-6", 300)
    assert answer["first_delivery_id"] == "delivery-3" and answer["announced_at"] == send("delivery-7", 310)[1]["announced_at"]
    assert send("delivery-5", 360, retrigger=True)[0] == 202
    # After webhook.announce_ttl_s, a plain new delivery starts a run again.
    assert send("delivery-8", 360 + 3599)[0] == 200
    assert send("delivery-9", 360 + 3601)[0] == 202
    events = emitted()
    assert [e.payload["delivery_id"] for e in events] == ["delivery-1", "delivery-3", "delivery-5", "delivery-9"]
    assert len({e.id for e in events}) == 4 and {e.payload["dataset_uri"] for e in events} == {str(data.resolve())}


# ----------------------------------------------------------------------------------------------------------------
# End to end: `fewtune webhook` against a real Prefect server


@pytest.fixture
def webhook(tmp_path, local_prefect_server):
    landing = tmp_path / "landing"
    landing.mkdir()
    port = free_port()
    config = tmp_path / "config.yaml"
    webhook = {"allowed_uris": [str(landing), "s3://bucket/landing/"], "port": port, "max_body_bytes": 4096,
               "state_db": str(tmp_path / "webhook.sqlite")}
    config.write_text(yaml.safe_dump({"name": "hooktest", "data": {"train": str(landing / "rows.jsonl")}, "webhook": webhook}))
    env = local_prefect_server.env(FEWTUNE_WEBHOOK_SECRET=SECRET)
    log_path = tmp_path / "webhook.log"
    proc = start_process([sys.executable, "-m", "flows.cli", "webhook", "--config", str(config)], env, log_path, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 120, "fewtune webhook to listen")
        yield base, landing, log_path
    finally:
        stop_process(proc)


def test_refused_requests_emit_nothing(webhook, local_prefect_server, tmp_path):
    base, landing, log_path = webhook
    api = Api(local_prefect_server.url)
    data = landing / "rows.jsonl"
    data.write_text((REPO / "examples/support/train.jsonl").read_text())
    sha = content_sha256(data)
    resource = f"fewtune.dataset.{sha[:16]}"
    url = base + PATH

    def body(**payload) -> bytes:
        return json.dumps({"delivery_id": uuid.uuid4().hex, "dataset_uri": str(data), **payload}).encode()

    def post(content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(url, content=content, headers=headers if headers is not None else signed_headers(SECRET, content))

    valid = body()
    old = int(time.time()) - 301
    big = json.dumps({"delivery_id": uuid.uuid4().hex, "dataset_uri": str(data), "pad": "x" * 5000}).encode()
    outside = tmp_path / "outside.jsonl"
    outside.write_text(data.read_text())
    cases = [
        ("unsigned", post(valid, {"Content-Type": "application/json"}), 401),
        ("wrong signature", post(valid, signed_headers("wrong-secret-but-long-enough", valid)), 401),
        ("stale timestamp", post(valid, signed_headers(SECRET, valid, timestamp=old)), 401),
        ("oversized body", post(big), 413),
        ("oversized, chunked", httpx.post(url, content=iter([big[:3000], big[3000:]]), headers=signed_headers(SECRET, big)), 413),
        ("malformed JSON", post(b'{"delivery_id": "abcdefgh", "dataset_uri": '), 400),
        ("unknown field", post(body(config="/etc/passwd")), 422),
        ("outside the allow-list", post(body(dataset_uri=str(outside))), 403),
        ("'..' in the path", post(body(dataset_uri=str(landing / ".." / "outside.jsonl"))), 422),
        ("encoded '..'", post(body(dataset_uri=f"file://{landing}/%2e%2e/outside.jsonl")), 422),
        ("object store without sha256", post(body(dataset_uri="s3://bucket/landing/rows.jsonl")), 422),
    ]
    for name, response, status in cases:
        assert response.status_code == status, (name, response.text)
        assert response.json()["status"] == "rejected", name

    time.sleep(3)  # an emitted event would have reached the server by now
    assert api.events("fewtune.dataset.landed", resource) == []

    # The control: the same valid body, signed, is accepted once and emits exactly one event ...
    first = post(valid)
    assert first.status_code == 202, first.text
    assert first.json()["content_sha256"] == sha
    # ... a replay of the very same request, and another delivery of the same content, start nothing new.
    replay = post(valid)
    assert replay.status_code == 409 and replay.json()["status"] == "duplicate"
    again = post(body())
    assert again.status_code == 200 and again.json()["status"] == "unchanged"

    events = wait_until(lambda: api.events("fewtune.dataset.landed", resource), 30, "the landed event")
    time.sleep(2)
    events = api.events("fewtune.dataset.landed", resource)
    assert len(events) == 1
    assert events[0]["payload"]["dataset_uri"] == str(data)
    assert events[0]["payload"]["content_sha256"] == sha

    log_text = log_path.read_text()
    assert "refused (401)" in log_text and "emitted fewtune.dataset.landed" in log_text
    assert SECRET not in log_text


def test_load_starts_one_run_per_content_and_per_retrigger(webhook, local_prefect_server):
    """500 deliveries from 8 threads through `fewtune webhook`: new content, other deliveries of that content (same
    file or a copy), exact replays, bad signatures (of content never announced) and retriggers. The landed events
    reaching the Prefect server, each of which starts one `dataset-landed` run, are distinct contents + retriggers."""
    base, landing, _ = webhook
    files = [landing / f"part-{i:03d}.jsonl" for i in range(140)]
    for i, f in enumerate(files):
        f.write_text(json.dumps({"prompt": f"question {i}", "completion": "answer"}) + "\n")
        if i < 50:
            shutil.copy(f, landing / f"copy-{f.name}")  # the same bytes under another name

    def request(kind: str, path: Path, secret: str = SECRET, **extra) -> tuple[str, bytes, dict[str, str]]:
        body = json.dumps({"delivery_id": uuid.uuid4().hex, "dataset_uri": str(path), **extra}).encode()
        return kind, body, signed_headers(secret, body)

    first = [request("new", f) for f in files[:100]]
    first += [request("duplicate", f) for f in files[:100]] + [request("duplicate", landing / f"copy-{f.name}") for f in files[:50]]
    bad = [request("bad signature", f, "wrong-secret-but-long-enough") for f in files[100:]]
    rng = random.Random(0)
    replays = [("replay", body, headers) for _, body, headers in rng.sample(first, 135)]  # the same requests again
    phases = [first + bad[:20], [request("retrigger", f, retrigger=True) for f in files[:75]] + replays + bad[20:]]
    answers: Counter = Counter()
    start = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        for phase in phases:  # the retriggers and replays follow the first deliveries
            rng.shuffle(phase)
            answers.update(pool.map(lambda r: (r[0], client.post(PATH, content=r[1], headers=r[2]).status_code), phase))
    seconds = time.perf_counter() - start
    assert answers[("new", 202)] + answers[("duplicate", 202)] == 100, answers  # one per distinct content
    assert answers[("new", 200)] + answers[("duplicate", 200)] == 150, answers
    assert answers[("bad signature", 401)] == 40 and answers[("retrigger", 202)] == 75 and answers[("replay", 409)] == 135

    api, resources = Api(local_prefect_server.url), [f"fewtune.dataset.{content_sha256(f)[:16]}" for f in files]
    query = {"filter": {"event": {"name": ["fewtune.dataset.landed"]}, "resource": {"id": resources}}, "limit": 1}
    landed = lambda: api.http.post("/events/filter", json=query).json()["total"]  # noqa: E731
    wait_until(lambda: landed() >= 175, 60, "175 landed events at the Prefect server", interval=0.5)
    arrived = time.perf_counter() - start
    time.sleep(3)
    assert landed() == 100 + 75, "distinct contents + retriggers; nothing for bad signatures, replays, duplicates"
    kinds = Counter(kind for phase in phases for kind, _, _ in phase)
    print(f"\n{sum(kinds.values())} deliveries ({dict(kinds)}) from 8 threads answered in {seconds:.1f} s; "
          f"answers {dict(sorted(answers.items()))}; 175 events at the Prefect server after {arrived:.1f} s")
