"""The receiver's protocol and its checks that need no state: the path and headers, HMAC signing (senders use
`sign` / `signed_headers` too), the request body's schema, and the dataset URI's shape and allow-list."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

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


def data_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


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
