"""The push lane's durable inbox: every webhook delivery, appended and fsynced before Redox hears 200.

A SQLite database in WAL mode with ``synchronous=FULL``: a committed append is on disk (the WAL is
fsynced at commit), so a receiver killed right after it answered loses nothing. Tables:

- ``deliveries``: one row per accepted delivery, in arrival order (``seq``), with its arrival time,
  headers (secrets removed by the receiver), body, the message key Redox's ids give it
  (``transforms.deliveries``) and ``duplicate_of``, the first delivery of the same key when this one
  is a redelivery; the loader reads only firsts, so a redelivery changes nothing downstream;
- ``rejections``: refused deliveries (bad token, too large, not JSON, ...): status, reason, size, time,
  never the body;
- ``state``: the loader's cursor (``loaded_seq``: every delivery up to it is in the lake) and the
  deliveries whose records are quarantined (``quarantined``), which each load keeps in the lake.

Invariants: rows of ``deliveries`` are never changed, only pruned once loaded and past retention;
``seq`` grows with arrival; the database and its folder are owner-only (they hold patient data).
This module stores and reads; what a delivery means is decided in assets/push.py.
"""

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from resources.settings import Settings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    key TEXT NOT NULL,
    surface TEXT,
    event TEXT NOT NULL,
    attempt TEXT,
    duplicate_of INTEGER,
    headers TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries (key);
CREATE INDEX IF NOT EXISTS deliveries_received ON deliveries (received_at);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantined (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds")


@dataclasses.dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate_of: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Incoming:
    """A delivery to append: what the receiver knows of it."""

    body: bytes
    headers: dict[str, str]
    key: str
    surface: str | None
    event: str
    attempt: str | None
    received_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    seq: int
    received_at: dt.datetime
    key: str
    surface: str | None
    event: str
    duplicate_of: int | None
    body: bytes


class Inbox:
    """One connection per thread to the inbox at ``path`` (created owner-only on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._local = threading.local()
        self._con().executescript(_SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a committed append survives a power cut.
            con.execute("PRAGMA synchronous=FULL")
            self._local.con = con
        return con

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # ---- the receiver's writes -----------------------------------------------------------------

    def append(
        self,
        body: bytes,
        *,
        headers: dict[str, str],
        key: str,
        surface: str | None,
        event: str,
        attempt: str | None,
        received_at: dt.datetime,
    ) -> Appended:
        """Store one delivery durably; returns its ``seq`` and, for a redelivery, the first one's."""
        item = Incoming(body, headers, key, surface, event, attempt, received_at)
        return self.append_many([item])[0]

    def append_many(self, items: list["Incoming"]) -> list[Appended]:
        """Store deliveries in one transaction (one fsync for all: group commit), in list order."""
        out: list[Appended] = []
        with self._tx() as con:
            for item in items:
                row = con.execute(
                    "SELECT seq FROM deliveries WHERE key = ? AND duplicate_of IS NULL LIMIT 1", [item.key]
                ).fetchone()
                first = int(row[0]) if row else None
                cur = con.execute(
                    "INSERT INTO deliveries"
                    " (received_at, key, surface, event, attempt, duplicate_of, headers, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        _iso(item.received_at),
                        item.key,
                        item.surface,
                        item.event,
                        item.attempt,
                        first,
                        json.dumps(item.headers),
                        item.body,
                    ],
                )
                out.append(Appended(int(cur.lastrowid or 0), first))
        return out

    def reject(self, *, status: int, reason: str, size: int, received_at: dt.datetime) -> None:
        """Record a refused delivery: never its body, which may hold PHI or be an attacker's."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO rejections (received_at, status, reason, size) VALUES (?, ?, ?, ?)",
                [_iso(received_at), status, reason, size],
            )

    # ---- the loader's reads and cursor ---------------------------------------------------------

    def _get(self, name: str) -> str | None:
        row = self._con().execute("SELECT value FROM state WHERE name = ?", [name]).fetchone()
        return None if row is None else str(row[0])

    def loaded_seq(self) -> int:
        return int(self._get("loaded_seq") or 0)

    def head_seq(self) -> int:
        row = self._con().execute("SELECT max(seq) FROM deliveries").fetchone()
        return int(row[0] or 0) if row else 0

    def deliveries(
        self,
        *,
        after_seq: int = 0,
        upto_seq: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        seqs: list[int] | None = None,
    ) -> list[Delivery]:
        """Deliveries in arrival order, redeliveries included (``duplicate_of`` says which)."""
        where, params = ["seq > ?"], [after_seq]
        if upto_seq is not None:
            where.append("seq <= ?")
            params.append(upto_seq)
        if since is not None:
            where.append("received_at >= ?")
            params.append(_iso(since))  # type: ignore[arg-type]
        if until is not None:
            where.append("received_at < ?")
            params.append(_iso(until))  # type: ignore[arg-type]
        if seqs is not None:
            where.append("seq IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(seqs))  # type: ignore[arg-type]
        rows = self._con().execute(
            "SELECT seq, received_at, key, surface, event, duplicate_of, body FROM deliveries"
            f" WHERE {' AND '.join(where)} ORDER BY seq",
            params,
        )
        return [
            Delivery(int(s), dt.datetime.fromisoformat(r), k, su, e, d, bytes(b))
            for s, r, k, su, e, d, b in rows
        ]

    def quarantined(self) -> list[int]:
        return [int(r[0]) for r in self._con().execute("SELECT seq FROM quarantined ORDER BY seq")]

    def commit_load(
        self,
        *,
        upto_seq: int | None,
        quarantined: list[int],
        cleared: list[int],
        summary: dict[str, Any],
    ) -> None:
        """After the lake committed a load: move the cursor (never backwards) and the quarantined set."""
        with self._tx() as con:
            if upto_seq is not None:
                con.execute(
                    "INSERT INTO state VALUES ('loaded_seq', ?) ON CONFLICT (name) DO UPDATE SET"
                    " value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    [str(upto_seq)],
                )
            con.executemany("DELETE FROM quarantined WHERE seq = ?", [[s] for s in cleared])
            con.executemany("INSERT OR IGNORE INTO quarantined VALUES (?)", [[s] for s in quarantined])
            con.execute(
                "INSERT INTO state VALUES ('last_load', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [json.dumps(summary, default=str)],
            )

    # ---- inspection and retention --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts and times only: depth, last delivery, rejections by reason, the last load."""
        con = self._con()
        loaded = self.loaded_seq()
        total, dups, last = con.execute(
            "SELECT count(*), count(duplicate_of), max(received_at) FROM deliveries"
        ).fetchone()
        depth, oldest = con.execute(
            "SELECT count(*), min(received_at) FROM deliveries WHERE seq > ? AND duplicate_of IS NULL",
            [loaded],
        ).fetchone()
        rejected = {
            f"{status} {reason}": int(n)
            for status, reason, n in con.execute(
                "SELECT status, reason, count(*) FROM rejections GROUP BY 1, 2 ORDER BY 1, 2"
            )
        }
        last_load = self._get("last_load")
        return {
            "inbox": str(self.path),
            "deliveries": int(total),
            "redeliveries": int(dups),
            "depth": int(depth),
            "oldest_unloaded": oldest,
            "last_delivery": last,
            "loaded_seq": loaded,
            "quarantined_deliveries": len(self.quarantined()),
            "rejected": rejected,
            "last_load": json.loads(last_load) if last_load else None,
        }

    def prune(self, *, older_than: dt.datetime) -> int:
        """Delete loaded deliveries that arrived before ``older_than`` (never unloaded or quarantined
        ones), and rejections as old. Returns the deliveries removed."""
        with self._tx() as con:
            cur = con.execute(
                "DELETE FROM deliveries WHERE received_at < ? AND seq <= ?"
                " AND seq NOT IN (SELECT seq FROM quarantined)",
                [_iso(older_than), self.loaded_seq()],
            )
            con.execute("DELETE FROM rejections WHERE received_at < ?", [_iso(older_than)])
            return int(cur.rowcount)


class InboxResource(dg.ConfigurableResource):
    """The push lane's inbox; by default where the settings put it (``REDOX_WEBHOOK_INBOX``)."""

    path: str | None = Field(
        default=None, description="Inbox file; default $REDOX_ETL_HOME/inbox/inbox.sqlite."
    )
    retention_days: int | None = Field(default=None, description="Days loaded deliveries are kept.")

    def file(self) -> Path:
        return Path(self.path) if self.path else Settings.from_env().inbox_file

    def open(self) -> Inbox:
        return Inbox(self.file())

    def retention(self) -> dt.timedelta:
        days = self.retention_days or Settings.from_env().webhook_retention_days
        return dt.timedelta(days=days)
