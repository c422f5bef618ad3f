"""Everything `POST /hooks/dataset-landed` decides, independent of the web framework: verify (current or previous
secret), parse, check the URI, size and content, claim the delivery, emit the Prefect event."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deployments.serve import require_api_url
from deployments.webhook.security import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DatasetLanded,
    Location,
    Rejected,
    check_dataset_size,
    check_dataset_uri,
    content_sha256,
    data_files,
    sign,
)
from deployments.webhook.store import Claim, DeliveryStore
from tasks.common.home import fewtune_home
from tasks.config import ConfigError, FewtuneConfig

log = logging.getLogger("fewtune.webhook")

_EVENT_NAMESPACE = uuid.UUID("6f1f3a52-7d7e-4c59-9a43-0b1d8e6a2c11")  # delivery id -> stable event id


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

    def __init__(self, cfg: FewtuneConfig, secret: str, store: DeliveryStore, previous_secret: str | None = None):
        self.settings, self.event = cfg.webhook, cfg.serve.event
        # During a rotation the previous secret is accepted too (see docs/operations.md).
        self._secrets = (secret,) + ((previous_secret,) if previous_secret and previous_secret != secret else ())
        self.store = store
        self._hashes: dict[tuple, str] = {}  # (path, sizes and mtimes) -> sha256: repeats are not re-read

    def _hash(self, path: Path) -> str:
        stamp = (str(path), tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f in data_files(path) for st in [f.stat()]))
        if (known := self._hashes.get(stamp)) is None:
            if len(self._hashes) >= 256:
                self._hashes.clear()
            known = self._hashes[stamp] = content_sha256(path)
        return known

    def __repr__(self) -> str:  # the secret stays out of reprs and tracebacks
        return f"Receiver(event={self.event!r}, allowed_uris={self.settings.allowed_uris!r})"

    def verify(self, timestamp: str | None, signature: str | None, body: bytes, now: float) -> int:
        """Check the headers; the index of the secret that signed (0 current, 1 previous), or `Rejected` (401)."""
        if not timestamp or not signature:
            raise Rejected(401, f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise Rejected(401, f"{TIMESTAMP_HEADER} must be unix seconds")
        if abs(now - int(timestamp)) > self.settings.tolerance_s:
            raise Rejected(401, f"timestamp outside the accepted window of {self.settings.tolerance_s} s")
        sent = signature.strip().encode()
        # Every secret is compared, in constant time, whatever matched first: the timing tells nothing.
        matches = [hmac.compare_digest(sign(secret, timestamp, body).encode(), sent) for secret in self._secrets]
        if not any(matches):
            raise Rejected(401, "signature does not match")
        return matches.index(True)

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
        check_dataset_size(payload.dataset_uri, location.local, self.settings.max_dataset_bytes)  # before hashing
        actual = self._hash(location.local)
        if payload.sha256 is not None and payload.sha256 != actual:
            raise Rejected(422, "sha256 does not match the data on disk (still being written?)")
        return actual

    def handle(self, timestamp: str | None, signature: str | None, body: bytes, now: float | None = None) -> tuple[int, dict[str, Any]]:
        now = time.time() if now is None else now
        try:
            signer = self.verify(timestamp, signature, body, now)
            payload = self.parse(body)
            location = check_dataset_uri(payload.dataset_uri, self.settings.allowed_uris)
            sha = self.content(payload, location)
        except Rejected as exc:
            log.warning("refused (%d): %s", exc.status, exc.detail)
            return exc.status, {"status": "rejected", "detail": exc.detail}
        if signer:
            log.warning("delivery %s: signed with the previous secret (%s); switch the sender to the new one",
                        payload.delivery_id, self.settings.previous_secret_env)
        claim = self.store.claim(payload.delivery_id, sha, payload.dataset_uri, now, retrigger=payload.retrigger)
        answer: dict[str, Any] = {"delivery_id": payload.delivery_id, "content_sha256": sha}
        if claim.verdict == "replay":
            log.warning("delivery %s: replayed, ignored", payload.delivery_id)
            return 409, {**answer, "status": "duplicate", "detail": "this delivery id was already received"}
        if claim.verdict == "unchanged":
            log.info("delivery %s: content of %s already announced by %s; no new run", payload.delivery_id, payload.dataset_uri, claim.first_delivery_id)
            return 200, {**answer, **self._unchanged(claim)}
        event_id = emit_dataset_landed(self.event, location, sha, payload.delivery_id)
        if event_id is None:
            self.store.release(payload.delivery_id, sha, claim)
            log.error("delivery %s: could not emit %s; the sender may retry", payload.delivery_id, self.event)
            return 503, {**answer, "status": "unavailable", "detail": "could not reach the Prefect API; retry later"}
        again = f" again (retrigger; announced before by {claim.first_delivery_id})" if claim.verdict == "again" else ""
        log.info("delivery %s: %s landed%s (sha256 %s); emitted %s %s", payload.delivery_id, payload.dataset_uri, again, sha[:16], self.event, event_id)
        extra = {"retriggered": True, "previous_delivery_id": claim.first_delivery_id} if claim.verdict == "again" else {}
        return 202, {**answer, "status": "accepted", "event_id": event_id, **extra}

    def _unchanged(self, claim: Claim) -> dict[str, Any]:
        """The 200 answer to known content: which delivery announced it, when, and how to start a run anyway."""
        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

        first, at = claim.first_delivery_id, claim.announced_at or 0.0
        after = iso(at + self.settings.announce_ttl_s)
        return {
            "status": "unchanged",
            "first_delivery_id": first,
            "announced_at": iso(at),
            "retrigger_after": after,
            "detail": f"this content was announced by delivery {first} at {iso(at)}; no new run. To run on it again "
            f"(e.g. after a failed run), send a new delivery_id with \"retrigger\": true, or deliver it again after "
            f"{after} (webhook.announce_ttl_s)",
        }


def load_receiver(cfg: FewtuneConfig) -> Receiver:
    """A receiver for `cfg`, or `ConfigError` saying what is missing (secret, allow-list, Prefect API)."""
    settings = cfg.webhook
    secret = os.environ.get(settings.secret_env, "")
    if len(secret) < settings.min_secret_length:
        raise ConfigError(
            f"webhook: set the environment variable {settings.secret_env} to the shared secret "
            f"(at least {settings.min_secret_length} characters, e.g. from `openssl rand -hex 32`)"
        )
    previous = os.environ.get(settings.previous_secret_env, "")
    if previous and len(previous) < settings.min_secret_length:
        raise ConfigError(
            f"webhook: the previous secret in {settings.previous_secret_env} is shorter than "
            f"{settings.min_secret_length} characters: set it to the secret senders used so far, or unset it"
        )
    if not settings.allowed_uris:
        raise ConfigError(
            "webhook.allowed_uris is empty: list the folders and object-store prefixes datasets may land in, "
            "e.g. --set 'webhook.allowed_uris=[/data/landing, s3://my-bucket/landing/]'"
        )
    if settings.delivery_ttl_s <= settings.tolerance_s:
        raise ConfigError("webhook.delivery_ttl_s must be longer than webhook.tolerance_s, or replays slip through")
    require_api_url("fewtune webhook")
    store = DeliveryStore(settings.state_db or fewtune_home() / "webhook.sqlite", settings.delivery_ttl_s, settings.announce_ttl_s)
    if previous and previous != secret:
        log.warning("accepting the previous secret (%s) too, until it is unset", settings.previous_secret_env)
    return Receiver(cfg, secret, store, previous_secret=previous or None)
