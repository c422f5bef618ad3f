"""`fewtune webhook`: the signed receiver for "a dataset has landed" notifications.

`POST /hooks/dataset-landed` accepts a small JSON body from the system that lands data (an ETL job, an object-store
notification relay, a CI job)::

    {"delivery_id": "3f1c9e0a-...", "dataset_uri": "/data/landing/2026-05-01.jsonl", "sha256": "<optional hex>"}

and, when everything checks out, emits the Prefect event `fewtune.dataset.landed` (config `serve.event`). The
`dataset-landed` deployment (`fewtune serve`, or `deployments/prefect.yaml` with a worker) has a trigger on that
event and starts a flow run with `dataset` set to the payload's URI. Inbound webhooks of the open-source Prefect
server do not exist, which is why this receiver is part of fewtune.

Checks, in order (the first failure answers, and nothing is recorded or emitted):

==========================  ====  ===============================================================================
check                       code  rule
==========================  ====  ===============================================================================
body size                   413   at most `webhook.max_body_bytes`, enforced while reading (Content-Length or not)
signature headers           401   `X-Fewtune-Timestamp` (unix seconds) and `X-Fewtune-Signature: sha256=<hex>`
timestamp                   401   within `webhook.tolerance_s` of the receiver's clock (stale or future: refused)
signature                   401   HMAC-SHA256 with the shared secret over `<timestamp>.<raw body>`, constant time
JSON                        400   the body parses as JSON
schema                      422   exactly the fields above; delivery_id 8-128 of [A-Za-z0-9._:-]; sha256 64 hex
URI shape                   422   no `..` segment (also percent-encoded), no backslash/control characters; local
                                  paths absolute; object-store URIs without query, fragment or credentials
allow-list                  403   inside an absolute folder of `webhook.allowed_uris` (symlinks resolved) or under
                                  one of its object-store prefixes
content                     422   local data must exist (and match `sha256` when given); object-store URIs need
                                  `sha256` (the receiver cannot read the bucket)
replay                      409   a delivery id seen before (remembered `webhook.delivery_ttl_s` in SQLite)
==========================  ====  ===============================================================================

Then: content already announced (same SHA-256) → 200 `unchanged`, no event; otherwise the event is emitted → 202
`accepted`. The decisions are atomic in SQLite, so concurrent duplicates collapse into one event. The secret comes
from the environment variable named by `webhook.secret_env` and is never logged or echoed.

Senders sign like this (Python; `sign` below does the same)::

    ts = str(int(time.time()))
    sig = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {"X-Fewtune-Timestamp": ts, "X-Fewtune-Signature": "sha256=" + sig, "Content-Type": "application/json"}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from tasks.config import ConfigError, FewtuneConfig

log = logging.getLogger("fewtune.webhook")

PATH = "/hooks/dataset-landed"
TIMESTAMP_HEADER = "X-Fewtune-Timestamp"
SIGNATURE_HEADER = "X-Fewtune-Signature"
_EVENT_NAMESPACE = uuid.UUID("6f1f3a52-7d7e-4c59-9a43-0b1d8e6a2c11")  # delivery id -> stable event id


# ----------------------------------------------------------------------------------------------------------------
# Signing (used by senders and by the receiver)


def sign(secret: str, timestamp: str | int, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`: `sha256=<hex HMAC-SHA256>`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(secret, ts, body), "Content-Type": "application/json"}


# ----------------------------------------------------------------------------------------------------------------
# Payload and URI checks


class DatasetLanded(BaseModel):
    """The request body; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    delivery_id: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    dataset_uri: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Rejected(Exception):
    """A request the receiver refuses: HTTP status and a message for the sender (no secrets in it)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Location:
    uri: str  # as sent
    local: Path | None  # resolved local path, or None for an object-store URI


def _segments(text: str) -> set[str]:
    return set(text.replace("\\", "/").split("/"))


def check_dataset_uri(uri: str, allowed: list[str]) -> Location:
    """Where `uri` points, if it is well formed and inside the allow-list; else `Rejected` (422 or 403)."""
    if any(ord(c) < 32 or c == "\x7f" for c in uri) or "\\" in uri:
        raise Rejected(422, "dataset_uri: control characters and backslashes are not allowed")
    decoded_once = unquote(uri)
    if ".." in _segments(uri) | _segments(decoded_once) | _segments(unquote(decoded_once)):
        raise Rejected(422, "dataset_uri: '..' path segments are not allowed")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") and (scheme == "file" or uri.startswith("/")):
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise Rejected(422, "dataset_uri: file:// URIs must name a local path (file:///data/...)")
        if scheme == "file" and (parts.query or parts.fragment):
            raise Rejected(422, "dataset_uri: query strings and fragments are not allowed")
        raw = Path(unquote(parts.path)) if scheme == "file" else Path(uri)  # plain paths are taken literally
        real = Path(os.path.realpath(raw))
        for entry in allowed:
            if "://" not in entry and real.is_relative_to(Path(os.path.realpath(entry))):
                return Location(uri, real)
        raise Rejected(403, "dataset_uri: outside the folders this receiver accepts (webhook.allowed_uris)")
    if not scheme or "://" not in uri:
        raise Rejected(422, "dataset_uri: use an absolute path, file:///path or scheme://bucket/key")
    if parts.query or parts.fragment or "@" in parts.netloc or not parts.netloc:
        raise Rejected(422, "dataset_uri: object-store URIs need a bucket and no query, fragment or credentials")
    normalized = f"{scheme}://{parts.netloc}{parts.path}"
    for entry in allowed:
        if "://" not in entry:
            continue
        prefix = entry if entry.endswith("/") else entry + "/"
        e_parts = urlsplit(prefix)
        prefix = f"{e_parts.scheme.lower()}://{e_parts.netloc}{e_parts.path}"
        if normalized.startswith(prefix) or normalized == prefix.rstrip("/"):
            return Location(uri, None)
    raise Rejected(403, "dataset_uri: outside the object-store prefixes this receiver accepts (webhook.allowed_uris)")


def _data_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; for a folder, of every file's relative name and bytes in sorted order."""
    h = hashlib.sha256()
    for f in _data_files(path):
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Deliveries and dataset hashes seen (SQLite: survives restarts; atomic under concurrent requests)


class DeliveryStore:
    def __init__(self, path: str | Path, ttl_s: int):
        self.path, self.ttl_s = Path(path), ttl_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, "
            "content_sha256 TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS deliveries_received ON deliveries (received_at)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS datasets (content_sha256 TEXT PRIMARY KEY, dataset_uri TEXT NOT NULL, "
            "delivery_id TEXT NOT NULL, announced_at REAL NOT NULL)"
        )

    def claim(self, delivery_id: str, sha: str, uri: str, now: float) -> tuple[str, str | None]:
        """Record a delivery: ('replay', None) | ('unchanged', first delivery id) | ('new', None), atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM deliveries WHERE received_at < ?", (now - self.ttl_s,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?)", (delivery_id, now, sha)
                ).rowcount
                if not inserted:
                    self._db.execute("COMMIT")
                    return "replay", None
                row = self._db.execute("SELECT delivery_id FROM datasets WHERE content_sha256 = ?", (sha,)).fetchone()
                if row:
                    self._db.execute("COMMIT")
                    return "unchanged", row[0]
                self._db.execute("INSERT INTO datasets VALUES (?, ?, ?, ?)", (sha, uri, delivery_id, now))
                self._db.execute("COMMIT")
                return "new", None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def release(self, delivery_id: str, sha: str) -> None:
        """Forget a delivery whose event could not be sent, so the sender's retry is not taken for a replay."""
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE delivery_id = ?", (delivery_id,))
            self._db.execute("DELETE FROM datasets WHERE content_sha256 = ? AND delivery_id = ?", (sha, delivery_id))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "deliveries": self._db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0],
                "datasets": self._db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0],
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------------------------------------------
# The receiver


def emit_dataset_landed(event: str, location: Location, sha: str, delivery_id: str) -> str | None:
    """Emit the Prefect event that the `dataset-landed` deployment's trigger waits for; its id, or None on failure."""
    from prefect.events import emit_event

    # A local dataset is passed on as the path that was checked (symlinks resolved), not as sent.
    dataset = str(location.local) if location.local is not None else location.uri
    sent = emit_event(
        event=event,
        resource={"prefect.resource.id": f"fewtune.dataset.{sha[:16]}", "prefect.resource.name": dataset},
        payload={"dataset_uri": dataset, "requested_uri": location.uri, "content_sha256": sha, "delivery_id": delivery_id},
        id=uuid.uuid5(_EVENT_NAMESPACE, delivery_id),
    )
    return str(sent.id) if sent is not None else None


class Receiver:
    """Everything `POST /hooks/dataset-landed` decides, independent of the web framework."""

    def __init__(self, cfg: FewtuneConfig, secret: str, store: DeliveryStore):
        self.settings, self.event = cfg.webhook, cfg.serve.event
        self._secret = secret
        self.store = store
        self._hashes: dict[tuple, str] = {}  # (path, sizes and mtimes) -> sha256: repeats are not re-read

    def _hash(self, path: Path) -> str:
        stamp = (str(path), tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f in _data_files(path) for st in [f.stat()]))
        if (known := self._hashes.get(stamp)) is None:
            if len(self._hashes) >= 256:
                self._hashes.clear()
            known = self._hashes[stamp] = content_sha256(path)
        return known

    def __repr__(self) -> str:  # the secret stays out of reprs and tracebacks
        return f"Receiver(event={self.event!r}, allowed_uris={self.settings.allowed_uris!r})"

    def verify(self, timestamp: str | None, signature: str | None, body: bytes, now: float) -> None:
        if not timestamp or not signature:
            raise Rejected(401, f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise Rejected(401, f"{TIMESTAMP_HEADER} must be unix seconds")
        if abs(now - int(timestamp)) > self.settings.tolerance_s:
            raise Rejected(401, f"timestamp outside the accepted window of {self.settings.tolerance_s} s")
        if not hmac.compare_digest(sign(self._secret, timestamp, body).encode(), signature.strip().encode()):
            raise Rejected(401, "signature does not match")

    def parse(self, body: bytes) -> DatasetLanded:
        try:
            json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Rejected(400, f"body is not valid JSON ({exc})") from None
        try:
            return DatasetLanded.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            raise Rejected(422, f"payload does not match the schema: {problems}") from None

    def content(self, payload: DatasetLanded, location: Location) -> str:
        if location.local is None:
            if payload.sha256 is None:
                raise Rejected(422, "sha256 is required for object-store URIs (the receiver does not read buckets)")
            return payload.sha256
        if not location.local.exists():
            raise Rejected(422, "dataset_uri: no such file or folder")
        actual = self._hash(location.local)
        if payload.sha256 is not None and payload.sha256 != actual:
            raise Rejected(422, "sha256 does not match the data on disk (still being written?)")
        return actual

    def handle(self, timestamp: str | None, signature: str | None, body: bytes, now: float | None = None) -> tuple[int, dict[str, Any]]:
        now = time.time() if now is None else now
        try:
            self.verify(timestamp, signature, body, now)
            payload = self.parse(body)
            location = check_dataset_uri(payload.dataset_uri, self.settings.allowed_uris)
            sha = self.content(payload, location)
        except Rejected as exc:
            log.warning("refused (%d): %s", exc.status, exc.detail)
            return exc.status, {"status": "rejected", "detail": exc.detail}
        verdict, first = self.store.claim(payload.delivery_id, sha, payload.dataset_uri, now)
        answer: dict[str, Any] = {"delivery_id": payload.delivery_id, "content_sha256": sha}
        if verdict == "replay":
            log.warning("delivery %s: replayed, ignored", payload.delivery_id)
            return 409, {**answer, "status": "duplicate", "detail": "this delivery id was already received"}
        if verdict == "unchanged":
            log.info("delivery %s: content of %s already announced by %s; no new run", payload.delivery_id, payload.dataset_uri, first)
            return 200, {**answer, "status": "unchanged", "first_delivery_id": first}
        event_id = emit_dataset_landed(self.event, location, sha, payload.delivery_id)
        if event_id is None:
            self.store.release(payload.delivery_id, sha)
            log.error("delivery %s: could not emit %s; the sender may retry", payload.delivery_id, self.event)
            return 503, {**answer, "status": "unavailable", "detail": "could not reach the Prefect API; retry later"}
        log.info("delivery %s: %s landed (sha256 %s); emitted %s %s", payload.delivery_id, payload.dataset_uri, sha[:16], self.event, event_id)
        return 202, {**answer, "status": "accepted", "event_id": event_id}


def load_receiver(cfg: FewtuneConfig) -> Receiver:
    """A receiver for `cfg`, or `ConfigError` saying what is missing (secret, allow-list, Prefect API)."""
    from deployments.serve import require_api_url

    settings = cfg.webhook
    secret = os.environ.get(settings.secret_env, "")
    if len(secret) < settings.min_secret_length:
        raise ConfigError(
            f"webhook: set the environment variable {settings.secret_env} to the shared secret "
            f"(at least {settings.min_secret_length} characters, e.g. from `openssl rand -hex 32`)"
        )
    if not settings.allowed_uris:
        raise ConfigError(
            "webhook.allowed_uris is empty: list the folders and object-store prefixes datasets may land in, "
            "e.g. --set 'webhook.allowed_uris=[/data/landing, s3://my-bucket/landing/]'"
        )
    if settings.delivery_ttl_s <= settings.tolerance_s:
        raise ConfigError("webhook.delivery_ttl_s must be longer than webhook.tolerance_s, or replays slip through")
    require_api_url("fewtune webhook")
    from tasks.common.home import fewtune_home

    store = DeliveryStore(settings.state_db or fewtune_home() / "webhook.sqlite", settings.delivery_ttl_s)
    return Receiver(cfg, secret, store)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(400, "invalid Content-Length")
        if int(declared) > limit:
            raise Rejected(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(receiver: Receiver) -> FastAPI:
    """The FastAPI app: `POST /hooks/dataset-landed` and `GET /healthz`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        from prefect.events.worker import EventsWorker

        await run_in_threadpool(EventsWorker.drain_all, 10)  # send events still queued before exiting
        receiver.store.close()

    app = FastAPI(title="fewtune webhook", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PATH)
    async def dataset_landed(request: Request) -> JSONResponse:
        try:
            body = await _read_limited(request, receiver.settings.max_body_bytes)
        except Rejected as exc:
            log.warning("refused (%d): %s", exc.status, exc.detail)
            return JSONResponse({"status": "rejected", "detail": exc.detail}, status_code=exc.status)
        status, answer = await run_in_threadpool(
            receiver.handle, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER), body
        )
        return JSONResponse(answer, status_code=status)

    return app


def serve_webhook(cfg: FewtuneConfig, host: str | None = None, port: int | None = None) -> None:
    """Run the receiver until interrupted (uvicorn, one process)."""
    import uvicorn

    # A plain handler: one short line per decision, cheap enough for bursts of deliveries.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    receiver = load_receiver(cfg)
    host = host or cfg.webhook.host
    port = port or cfg.webhook.port
    log.info("listening on http://%s:%d%s; allowed: %s", host, port, PATH, ", ".join(cfg.webhook.allowed_uris))
    uvicorn.run(create_app(receiver), host=host, port=port, log_level="info", access_log=False)
