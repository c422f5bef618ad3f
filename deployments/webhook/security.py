"""The receiver's protocol and its checks that need no state: the path and headers, HMAC signing (senders use
`sign` / `signed_headers` too), the request body's schema, and the dataset URI's shape, allow-list and size (the
rules live in `tasks.common.landing`, shared with the flow, which applies them again before reading)."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks.common.landing import DatasetRefused, Location, data_files, local_size, locate

PATH = "/hooks/dataset-landed"
TIMESTAMP_HEADER = "X-Fewtune-Timestamp"
SIGNATURE_HEADER = "X-Fewtune-Signature"


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
    retrigger: bool = False  # true: start a run even if this content was announced recently (e.g. after a failed run)


class Rejected(Exception):
    """A request the receiver refuses: HTTP status and a message for the sender (no secrets in it)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


_STATUS = {"malformed": 422, "outside": 403, "too_large": 422}


def check_dataset_uri(uri: str, allowed: list[str]) -> Location:
    """Where `uri` points, if it is well formed and inside the allow-list; else `Rejected` (422 or 403).

    The rules are `tasks.common.landing.locate`, which flow runs apply to their `dataset` parameter too."""
    try:
        return locate(uri, allowed)
    except DatasetRefused as exc:
        raise Rejected(_STATUS[exc.kind], f"dataset_uri: {exc.problem}") from None


def check_dataset_size(uri: str, path: Path, max_bytes: int) -> None:
    """`Rejected` (422) when the local data at `path` is over `max_bytes` (`webhook.max_dataset_bytes`)."""
    try:
        local_size(path, uri, max_bytes)
    except DatasetRefused as exc:
        raise Rejected(_STATUS[exc.kind], f"dataset_uri: {exc.problem}") from None


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; for a folder, of every file's relative name and bytes in sorted order."""
    h = hashlib.sha256()
    for f in data_files(path):
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
