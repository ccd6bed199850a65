"""Storage faults (issue #16, finding 8): a corrupt stored adapter is skipped at start-up, logged and reported, never
fatal; the store fsyncs what it commits; the job database keeps every acknowledged write through kill -9, and an
older database gains the owner columns."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import httpx

from adapters.tiers.store import AdapterStore
from server.jobs.store import JobStore
from tests.live import REPO, start_server, tiny_settings
from tests.tiny import make_peft_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def test_a_truncated_stored_adapter_is_skipped_and_reported_not_fatal(tmp_path, llama_dir):
    data = tmp_path / "data"
    peft = make_peft_adapter(llama_dir, tmp_path / "src", "llama", r=4, seed=5)
    files = {CONFIG: (CONFIG, (peft / CONFIG).read_bytes()), WEIGHTS: (WEIGHTS, (peft / WEIGHTS).read_bytes())}
    live = start_server(tiny_settings(llama_dir, data))
    try:
        for name in ("intact", "damaged"):
            assert httpx.post(f"{live.url}/v1/adapters", data={"name": name}, files=files).status_code == 201
    finally:
        live.stop()
    weights = data / "adapters" / "damaged" / "1" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (data / "adapters" / "broken-meta").mkdir()
    (data / "adapters" / "broken-meta" / "1").mkdir()
    (data / "adapters" / "broken-meta" / "1" / "meta.json").write_text("{not json")

    live = start_server(tiny_settings(llama_dir, data))  # today's code: the start-up thread dies, every route 503
    try:
        ready = httpx.get(f"{live.url}/health/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready" and {s["name"] for s in body["skipped"]} == {"damaged", "broken-meta"}
        assert all(s["reason"] for s in body["skipped"])
        ids = [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]]
        assert "intact" in ids and "damaged" not in ids
        r = httpx.post(f"{live.url}/v1/completions", json={"model": "intact", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        live.stop()


def test_the_store_fsyncs_files_and_directories_on_commit(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = AdapterStore(tmp_path / "adapters")
    scratch = store.scratch_dir()
    for f in (CONFIG, WEIGHTS):
        (scratch / f).write_bytes(b"{}")
    saved = store.save("a", scratch, 1)
    # the files and their directory before the rename, the directories the rename changed after it
    expected = [scratch / CONFIG, scratch / WEIGHTS, scratch / "meta.json", scratch, store.root, saved.path.parent]
    assert [str(p) for p in expected if str(p) not in synced] == [], synced
    synced.clear()
    store.set_public(saved.path, True)
    assert str(saved.path) in synced and json.loads((saved.path / "meta.json").read_text())["public"] is True


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from server.jobs.store import JobStore
    store = JobStore(Path(sys.argv[1]))
    job = store.add_job(adapter_name="a", method={}, training_file="f", validation_file=None, seed=1,
                        total_steps=1, max_seconds=1.0)
    print(job.id, flush=True)
    i = 0
    while True:
        i += 1
        store.add_event(job.id, "info", f"event {i}")
        print(i, flush=True)
""")


def test_the_job_database_keeps_every_acknowledged_write_through_kill_9(tmp_path):
    db = tmp_path / "jobs.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip()
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    acknowledged = [int(x) for x in proc.stdout.read().split()]
    proc.wait(10)
    assert acknowledged, "the writer wrote nothing"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = JobStore(db)
    messages = {e.message for e in store.events(job_id)}
    assert {f"event {i}" for i in acknowledged} <= messages
    assert store.get_job(job_id).status == "queued"


def test_an_older_job_database_gains_the_owner_columns(tmp_path):
    db = tmp_path / "jobs.db"
    with sqlite3.connect(db) as con:
        con.executescript("""
            CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
                                purpose TEXT NOT NULL, examples INTEGER NOT NULL, created_at INTEGER NOT NULL);
            INSERT INTO files VALUES ('file-old', 't.jsonl', 10, 'fine-tune', 2, 1);
        """)
    store = JobStore(db)
    old = store.get_file("file-old")
    assert old is not None and old.owner is None
    store.add_job(adapter_name="a", method={}, training_file="file-old", validation_file=None, seed=1, total_steps=1,
                  max_seconds=1.0, owner="acme")  # fmt: skip
    assert [j.owner for j in store.list_jobs()] == ["acme"]
    assert json.loads(json.dumps(old.to_api()))["id"] == "file-old"
