"""Durable teacher-response cache: one SQLite (WAL) row per response, committed on arrival.

Rows are keyed by :func:`request_key` = sha256 of (model, messages, sampling parameters, sample
index), so a restarted fetch finds every response that was paid for and asks the API only for the
rest. Only successes and permanent failures are stored; the API key never is.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    messages_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    cost REAL NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    created_at REAL NOT NULL
)
"""
_COLUMNS = (
    "key, messages_hash, status, text, finish_reason, prompt_tokens, completion_tokens, "
    "latency_s, cost, attempts, error"
)


def messages_hash(messages: list[dict]) -> str:
    """Short stable hash of a message list (the synthetic server's per-prompt key)."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def request_key(model: str, messages: list[dict], params: dict, sample: int = 0) -> str:
    """The cache key: sha256 of the model, the messages sent, the sampling parameters and, for
    ``sample`` > 0, the sample index (one key per independent draw of the same request).

    Sample 0 hashes ``[model, messages, params]`` exactly as before sample indices existed, so
    an older cache still serves every first occurrence.
    """
    if sample < 0:
        raise ValueError(f"sample index must be >= 0, got {sample}")
    parts = [model, messages, params] if sample == 0 else [model, messages, params, sample]
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Result:
    """One prompt's teacher response (``status="ok"``) or the reason it has none."""

    key: str
    messages_hash: str
    status: Literal["ok", "failed"]
    text: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    latency_s: float = 0.0
    cost: float = 0.0
    attempts: int = 0
    error: str | None = None
    permanent: bool = True  # False: a transient give-up (not stored, retried by the next run)
    cached: bool = False  # True: read from the cache, no request made


class ResponseCache:
    """SQLite cache in WAL mode; :meth:`put_many` commits (and fsyncs) before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(_SCHEMA)
            self.db.commit()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"teacher cache {self.path}: not a usable SQLite file ({e})") from e

    def put(self, r: Result, model: str, messages: list[dict], params: dict) -> None:
        """Store a response or permanent failure (replacing an older row for the key)."""
        self.put_many([(r, model, messages, params)])

    def put_many(self, items: list[tuple[Result, str, list[dict], dict]]) -> None:
        """Store ``(result, model, messages, params)`` items in one transaction (one fsync)."""
        now = time.time()
        rows = [
            (
                r.key,
                r.messages_hash,
                model,
                json.dumps(messages, ensure_ascii=False),
                json.dumps(params, sort_keys=True),
                r.status,
                r.text,
                r.finish_reason,
                r.usage["prompt_tokens"],
                r.usage["completion_tokens"],
                r.latency_s,
                r.cost,
                r.attempts,
                r.error,
                now,
            )
            for r, model, messages, params in items
        ]
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )

    def get_many(self, keys: list[str]) -> dict[str, Result]:
        """The stored results among ``keys`` (marked ``cached=True``)."""
        found: dict[str, Result] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT {_COLUMNS} FROM responses WHERE key IN ({marks})"
            for row in self.db.execute(query, chunk):
                found[row[0]] = _row_result(row)
        return found

    def get(self, key: str) -> Result | None:
        return self.get_many([key]).get(key)

    def totals(self) -> dict[str, float]:
        """Spend recorded in the cache: rows, ok/failed rows, API attempts, tokens, dollars."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(attempts), 0), "
            "COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost), 0.0) "
            "FROM responses"
        ).fetchone()
        rows, ok, attempts, tokens, cost = row
        return {
            "rows": rows,
            "ok": ok,
            "failed": rows - ok,
            "requests": attempts,
            "tokens": tokens,
            "dollars": cost,
        }

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def _row_result(row: tuple) -> Result:
    key, mhash, status, text, finish, pt, ct, latency, cost, attempts, error = row
    usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    return Result(
        key, mhash, status, text, finish, usage, latency, cost, attempts, error, True, True
    )
