"""Deliveries and dataset hashes seen (SQLite: survives restarts; atomic under concurrent requests)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


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
