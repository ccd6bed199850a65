"""The durable record of training files, jobs and job events: one SQLite database.

Jobs move through an explicit state machine (`TRANSITIONS`); every change is one conditional
`UPDATE ... WHERE status IN (allowed sources)`, so two writers can never both win and a job
never leaves a terminal state. Shaped like OpenAI's fine-tuning objects (API.md, Training jobs).
The database runs in WAL mode; every call takes a short lock on one shared connection. Durability is a setting
(`jobs_db_synchronous`): `full` (the default) fsyncs the log at every commit, so a committed write survives a
kill -9 and a power loss; `normal` survives a kill -9 (the process dies, the OS keeps its writes) but may lose the
last commits to a power loss. Files and jobs record the tenant that created them (`owner`); a database from before
that gains the column at start-up (a migration; old rows: the operator's).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.training.config import method_hyperparameters

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# new status → the statuses it may be reached from (running → queued: paused by a shutdown, to resume)
TRANSITIONS = {
    RUNNING: {QUEUED},
    QUEUED: {RUNNING},
    SUCCEEDED: {RUNNING},
    FAILED: {QUEUED, RUNNING},
    CANCELLED: {QUEUED, RUNNING},
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, purpose TEXT NOT NULL,
    examples INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, adapter_name TEXT NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, seed INTEGER NOT NULL, total_steps INTEGER NOT NULL,
    max_seconds REAL NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER NOT NULL DEFAULT 0, error TEXT, metrics TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,
    seconds_used REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""
# columns added since the first schema: (table, column, declaration); added to older databases at start-up
_MIGRATIONS = [("files", "owner", "TEXT"), ("jobs", "owner", "TEXT"), ("jobs", "model", "TEXT"), ("jobs", "suffix", "TEXT")]
TRAINER_METHOD = {"supervised": "lora"}  # OpenAI's method.type → the trainer's method (others: the same name)


class IllegalTransition(RuntimeError):
    """The job is not in a status the requested one may follow (e.g. cancelling a finished job)."""

    def __init__(self, job_id: str, status: str, target: str):
        super().__init__(f"job {job_id} is {status}; it cannot become {target}")
        self.status = status


@dataclass
class FileRecord:
    id: str
    filename: str
    bytes: int
    purpose: str
    examples: int
    created_at: int
    owner: str | None = None

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "filename": self.filename,
                "purpose": self.purpose, "created_at": self.created_at, "status": "processed"}


@dataclass
class JobRecord:
    id: str
    adapter_name: str
    status: str
    method: dict
    training_file: str
    validation_file: str | None
    seed: int
    total_steps: int
    max_seconds: float
    created_at: int
    started_at: int | None
    finished_at: int | None
    trained_tokens: int
    error: dict | None
    metrics: dict | None
    cancel_requested: bool
    seconds_used: float
    owner: str | None = None
    model: str | None = None
    """The base model's id."""
    suffix: str | None = None

    @property
    def trainer_method(self) -> str:
        kind = self.method.get("type", "lora")
        return TRAINER_METHOD.get(kind, kind)

    def to_api(self) -> dict:
        """OpenAI's fine_tuning.job object (and our extensions: adapter_name, metrics, seconds_used)."""
        kind = self.method.get("type", "lora")
        hp = method_hyperparameters(self.trainer_method, self.method.get("hyperparameters", {}))
        m = {"total_steps": self.total_steps} | (self.metrics or {})
        finish = None
        if self.status == RUNNING and m.get("step") and m.get("total_steps"):
            per_step = self.seconds_used / m["step"]
            finish = int(time.time() + per_step * (m["total_steps"] - m["step"]))
        return {
            "id": self.id, "object": "fine_tuning.job", "status": self.status, "model": self.model,
            "adapter_name": self.adapter_name, "suffix": self.suffix,
            "fine_tuned_model": self.adapter_name if self.status == SUCCEEDED else None,
            "training_file": self.training_file, "validation_file": self.validation_file,
            "method": {"type": kind, kind: {"hyperparameters": hp}, "hyperparameters": hp}, "hyperparameters": hp,
            "seed": self.seed, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "estimated_finish": finish, "trained_tokens": self.trained_tokens,
            "error": self.error, "metrics": m, "seconds_used": round(self.seconds_used, 1), "result_files": [],
            "organization_id": self.owner or "system", "integrations": [],
        }  # fmt: skip


@dataclass
class EventRecord:
    seq: int
    job_id: str
    created_at: int
    level: str
    message: str
    data: dict | None

    def to_api(self) -> dict:
        return {"id": f"ftevent-{self.seq}", "object": "fine_tuning.job.event", "created_at": self.created_at,
                "level": self.level, "message": self.message, "data": self.data,
                "type": "metrics" if self.data and "step" in self.data else "message"}

    def to_checkpoint(self, job: JobRecord) -> dict:
        """OpenAI's fine_tuning.job.checkpoint object, for an event whose data marks a checkpoint."""
        return {"id": f"ftckpt-{self.seq}", "object": "fine_tuning.job.checkpoint", "created_at": self.created_at,
                "fine_tuning_job_id": job.id, "step_number": self.data["step"], "metrics": self.data.get("metrics", {}),
                "fine_tuned_model_checkpoint": self.data.get("fine_tuned_model_checkpoint")}  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class JobStore:
    def __init__(self, path: Path, synchronous: str = "full"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            for table, column, decl in _MIGRATIONS:
                if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # --- files -------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        self._execute("INSERT INTO files (id, filename, bytes, purpose, examples, created_at, owner) VALUES"
                      " (?, ?, ?, ?, ?, ?, ?)", (record.id, record.filename, record.bytes, record.purpose,
                                                 record.examples, record.created_at, record.owner))  # fmt: skip

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(**dict(rows[0])) if rows else None

    def list_files(self) -> list[FileRecord]:
        return [FileRecord(**dict(r)) for r in self._query("SELECT * FROM files ORDER BY created_at DESC, id")]

    def delete_file(self, file_id: str) -> bool:
        return self._execute("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    def file_in_use(self, file_id: str) -> bool:
        """Whether a job that has not finished reads this file."""
        rows = self._query(
            f"SELECT 1 FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status NOT IN ({_marks(TERMINAL)})",
            (file_id, file_id, *TERMINAL))
        return bool(rows)

    # --- jobs --------------------------------------------------------------------------

    def add_job(self, *, adapter_name: str, method: dict, training_file: str, validation_file: str | None, seed: int,
                total_steps: int, max_seconds: float, owner: str | None = None, model: str | None = None,
                suffix: str | None = None) -> JobRecord:  # fmt: skip
        job_id, now = new_id("ftjob"), int(time.time())
        self._execute(
            "INSERT INTO jobs (id, adapter_name, status, method, training_file, validation_file, seed, total_steps,"
            " max_seconds, created_at, owner, model, suffix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, adapter_name, QUEUED, json.dumps(method), training_file, validation_file, seed, total_steps,
             max_seconds, now, owner, model, suffix))
        self.add_event(job_id, "info", f"Created fine-tuning job {job_id}")
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(self, status: str | None = None) -> list[JobRecord]:
        if status:
            return [_job(r) for r in self._query("SELECT * FROM jobs WHERE status = ? ORDER BY created_at, rowid", (status,))]
        return [_job(r) for r in self._query("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC")]

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def transition(self, job_id: str, target: str, **fields: Any) -> JobRecord:
        """Move the job to `target` (setting `fields` too) if its status allows; else IllegalTransition."""
        sources = TRANSITIONS[target]
        fields = {k: json.dumps(v) if k in ("error", "metrics") and v is not None else v for k, v in fields.items()}
        if target in TERMINAL:
            fields.setdefault("finished_at", int(time.time()))
        sets = ", ".join(["status = ?"] + [f"{k} = ?" for k in fields])
        n = self._execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({_marks(sources)})",
                          (target, *fields.values(), job_id, *sources))
        job = self.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        if n == 0:
            raise IllegalTransition(job_id, job.status, target)
        return job

    def update_progress(self, job_id: str, *, trained_tokens: int, metrics: dict, seconds_used: float) -> None:
        self._execute("UPDATE jobs SET trained_tokens = ?, metrics = ?, seconds_used = ? WHERE id = ?",
                      (trained_tokens, json.dumps(metrics), seconds_used, job_id))

    def request_cancel(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    # --- events ------------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        self._execute("INSERT INTO events (job_id, created_at, level, message, data) VALUES (?, ?, ?, ?, ?)",
                      (job_id, int(time.time()), level, message, None if data is None else json.dumps(data)))

    def events(self, job_id: str, after: int = 0, limit: int | None = None) -> list[EventRecord]:
        """Events in order, those with seq > `after`, at most `limit`."""
        sql = "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq"
        args: tuple = (job_id, after)
        if limit is not None:
            sql, args = sql + " LIMIT ?", (*args, limit)
        return [EventRecord(**(dict(r) | {"data": _loads(r["data"])})) for r in self._query(sql, args)]

    def checkpoints(self, job_id: str) -> list[EventRecord]:
        """The job's checkpoint events (data {"checkpoint": true, "step", "metrics", ...}), oldest first."""
        rows = self._query("SELECT * FROM events WHERE job_id = ? AND data LIKE '%\"checkpoint\": true%' ORDER BY seq",
                           (job_id,))  # fmt: skip
        return [e for e in (EventRecord(**(dict(r) | {"data": _loads(r["data"])})) for r in rows) if e.data.get("checkpoint")]


def _marks(values) -> str:
    return ", ".join("?" * len(values))


def _job(row: sqlite3.Row) -> JobRecord:
    d = dict(row)
    d["method"] = json.loads(d["method"])
    d["error"], d["metrics"] = _loads(d["error"]), _loads(d["metrics"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return JobRecord(**d)
