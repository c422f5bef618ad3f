"""Deliveries and dataset hashes seen (SQLite: survives restarts; atomic under concurrent requests).

`deliveries` remembers delivery ids for `webhook.delivery_ttl_s` (replays are refused). `datasets` remembers which
content was announced, by which delivery and when: another delivery of the same content within
`webhook.announce_ttl_s` starts no run (`unchanged`); after that, or with `retrigger`, it starts one again."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple


class Claim(NamedTuple):
    """What a delivery got: `verdict` is `new` (start a run), `again` (a run on content announced before, asked
    for with `retrigger`), `unchanged` (no run) or `replay` (delivery id seen before). For `unchanged` and
    `again`, the announcement on record before this delivery: its delivery id, time and URI."""

    verdict: str
    first_delivery_id: str | None = None
    announced_at: float | None = None
    announced_uri: str | None = None


class DeliveryStore:
    def __init__(self, path: str | Path, ttl_s: int, announce_ttl_s: int = 24 * 3600):
        self.path, self.ttl_s, self.announce_ttl_s = Path(path), ttl_s, announce_ttl_s
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

    def claim(self, delivery_id: str, sha: str, uri: str, now: float, retrigger: bool = False) -> Claim:
        """Record a delivery and decide, atomically, whether it starts a run (see `Claim`)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM deliveries WHERE received_at < ?", (now - self.ttl_s,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?)", (delivery_id, now, sha)
                ).rowcount
                if not inserted:
                    self._db.execute("COMMIT")
                    return Claim("replay")
                row = self._db.execute(
                    "SELECT delivery_id, announced_at, dataset_uri FROM datasets WHERE content_sha256 = ?", (sha,)
                ).fetchone()
                if row and not retrigger and now - row[1] < self.announce_ttl_s:
                    self._db.execute("COMMIT")
                    return Claim("unchanged", *row)
                self._db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?)", (sha, uri, delivery_id, now))
                self._db.execute("COMMIT")
                return Claim("again", *row) if row and retrigger else Claim("new")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def release(self, delivery_id: str, sha: str, claim: Claim | None = None) -> None:
        """Forget a delivery whose event could not be sent, so the sender's retry is not taken for a replay; the
        announcement it replaced (`claim` of a retrigger) is put back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM deliveries WHERE delivery_id = ?", (delivery_id,))
                gone = self._db.execute(
                    "DELETE FROM datasets WHERE content_sha256 = ? AND delivery_id = ?", (sha, delivery_id)
                ).rowcount
                if gone and claim is not None and claim.first_delivery_id is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO datasets VALUES (?, ?, ?, ?)",
                        (sha, claim.announced_uri, claim.first_delivery_id, claim.announced_at),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "deliveries": self._db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0],
                "datasets": self._db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0],
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()
