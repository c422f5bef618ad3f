"""The signed data-landing receiver: signature, URI allow-list, replay store, and its refusals end to end.

The unit tests exercise the checks directly. `test_refused_requests_emit_nothing` runs `fewtune webhook` as a
process against a real Prefect server and sends every kind of bad request: each is refused with its 4xx code, and
no `fewtune.dataset.landed` event reaches the server — until a valid delivery, which emits exactly one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.webhook import (
    PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryStore,
    Receiver,
    Rejected,
    check_dataset_uri,
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
    return Receiver(cfg, SECRET, DeliveryStore(tmp_path / "state.sqlite", cfg.webhook.delivery_ttl_s))


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
# URIs


def test_uri_allow_list_and_traversal(tmp_path):
    root = tmp_path / "landing"
    (root / "2026").mkdir(parents=True)
    data = root / "2026" / "rows.jsonl"
    data.write_text("{}\n")
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    sibling = tmp_path / "landing-evil"
    sibling.mkdir()
    (sibling / "rows.jsonl").write_text("{}\n")
    (root / "escape.jsonl").symlink_to(outside)
    allowed = [str(root), "s3://bucket/landing/"]

    assert check_dataset_uri(str(data), allowed).local == data.resolve()
    assert check_dataset_uri(data.as_uri(), allowed).local == data.resolve()
    assert check_dataset_uri("s3://bucket/landing/2026/rows.parquet", allowed).local is None

    refused = {
        str(root / ".." / "secret.jsonl"): 422,
        str(root) + "/2026/%2e%2e/%2e%2e/secret.jsonl": 422,
        "file://" + str(root) + "/%2e%2e/secret.jsonl": 422,
        "file://" + str(root) + "/%252e%252e/secret.jsonl": 422,
        str(root) + "\\..\\secret.jsonl": 422,
        str(data) + "\x00.txt": 422,
        "landing/2026/rows.jsonl": 422,  # relative
        "file://evil.example.com" + str(data): 422,
        str(outside): 403,
        str(sibling / "rows.jsonl"): 403,  # shares the allowed root's name as a prefix, not its folder
        str(root / "escape.jsonl"): 403,  # a symlink inside the root pointing outside
        "s3://bucket/landing-evil/rows.jsonl": 403,
        "s3://other/landing/rows.jsonl": 403,
        "gs://bucket/landing/rows.jsonl": 403,
        "s3://bucket/landing/../private/rows.jsonl": 422,
        "s3://bucket/landing/rows.jsonl?versionId=1": 422,
        "s3://user:pw@bucket/landing/rows.jsonl": 422,
        "http://bucket/landing/rows.jsonl": 403,
    }
    for uri, status in refused.items():
        with pytest.raises(Rejected) as info:
            check_dataset_uri(uri, allowed)
        assert info.value.status == status, uri


def test_allow_list_entries_must_be_absolute():
    with pytest.raises(ConfigError, match="absolute"):
        load_config(None, ["webhook.allowed_uris=[data/landing]"])
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        load_config(None, ["webhook.allowed_uris=[/data/../etc]"])


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


def _sig(body: bytes, secret: str = SECRET) -> tuple[str, str]:
    h = signed_headers(secret, body)
    return h[TIMESTAMP_HEADER], h[SIGNATURE_HEADER]


def test_content_checks(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    r = _receiver(tmp_path, [str(tmp_path), "s3://bucket/landing/"])

    def send(**payload):
        body = json.dumps({"delivery_id": uuid.uuid4().hex, **payload}).encode()
        return r.handle(*_sig(body), body)

    assert send(dataset_uri=str(tmp_path / "missing.jsonl"))[0] == 422
    assert send(dataset_uri=str(data), sha256="0" * 64)[0] == 422  # announced hash differs from the bytes on disk
    assert send(dataset_uri="s3://bucket/landing/rows.jsonl")[0] == 422  # object stores need the hash
    assert content_sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    assert r.store.counts()["deliveries"] == 0


def test_store_collapses_replays_and_unchanged_content_atomically(tmp_path):
    store = DeliveryStore(tmp_path / "state.sqlite", ttl_s=3600)
    now = time.time()
    assert store.claim("delivery-1", "a" * 64, "/d/1", now) == ("new", None)
    assert store.claim("delivery-1", "a" * 64, "/d/1", now) == ("replay", None)
    assert store.claim("delivery-2", "a" * 64, "/d/1-copy", now) == ("unchanged", "delivery-1")
    assert store.claim("delivery-3", "b" * 64, "/d/2", now) == ("new", None)
    store.release("delivery-3", "b" * 64)  # the event could not be sent: a retry must be able to succeed
    assert store.claim("delivery-3", "b" * 64, "/d/2", now) == ("new", None)
    # Old delivery ids are forgotten after the TTL (the timestamp window refuses such old requests anyway).
    assert store.claim("delivery-4", "c" * 64, "/d/3", now + 7200) == ("new", None)
    assert store.claim("delivery-1", "a" * 64, "/d/1", now + 7200) == ("unchanged", "delivery-1")
    store.close()

    # Many threads racing on the same delivery and on the same content: exactly one wins each.
    store = DeliveryStore(tmp_path / "race.sqlite", ttl_s=3600)
    verdicts: list[str] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        verdict, _ = store.claim(f"delivery-{i % 5}", "d" * 64, "/d/4", now)
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
    assert reopened.claim("delivery-0", "d" * 64, "/d/4", now)[0] == "replay"


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


# ----------------------------------------------------------------------------------------------------------------
# End to end: `fewtune webhook` against a real Prefect server


@pytest.fixture
def webhook(tmp_path, local_prefect_server):
    landing = tmp_path / "landing"
    landing.mkdir()
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "hooktest",
                "data": {"train": str(landing / "rows.jsonl")},
                "webhook": {
                    "allowed_uris": [str(landing), "s3://bucket/landing/"],
                    "port": port,
                    "max_body_bytes": 4096,
                    "state_db": str(tmp_path / "webhook.sqlite"),
                },
            }
        )
    )
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
