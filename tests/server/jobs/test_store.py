"""The job store (SQLite): the state machine, durability across a reopen, files and events."""

from __future__ import annotations

import pytest

from server.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, FileRecord, IllegalTransition, JobStore


def test_job_store_state_machine_and_durability(tmp_path):
    path = tmp_path / "jobs.db"
    store = JobStore(path)
    job = store.add_job(adapter_name="a", method={"type": "lora"}, training_file="file-1", validation_file=None,
                        seed=1, total_steps=10, max_seconds=60)
    assert job.status == QUEUED
    with pytest.raises(IllegalTransition):
        store.transition(job.id, SUCCEEDED)  # never ran
    store.transition(job.id, RUNNING, started_at=1)
    store.transition(job.id, QUEUED)  # paused by a shutdown
    store.transition(job.id, RUNNING)
    store.transition(job.id, SUCCEEDED)
    for target in (RUNNING, QUEUED, FAILED, CANCELLED):
        with pytest.raises(IllegalTransition):
            store.transition(job.id, target)  # terminal stays terminal
    store.add_event(job.id, "info", "hello", {"step": 1, "loss": 2.0})
    store.close()
    again = JobStore(path)
    j = again.get_job(job.id)
    assert j.status == SUCCEEDED and j.finished_at is not None and j.started_at == 1
    assert [e.message for e in again.events(job.id)][-1] == "hello"
    assert again.count_by_status() == {SUCCEEDED: 1}
    again.close()


def test_files_and_which_jobs_use_them(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.add_file(FileRecord("file-1", "train.jsonl", 10, "fine-tune", 3, 100))
    job = store.add_job(adapter_name="a", method={}, training_file="file-1", validation_file=None, seed=0,
                        total_steps=1, max_seconds=1)  # fmt: skip
    assert store.get_file("file-1").examples == 3 and store.file_in_use("file-1")
    store.transition(job.id, CANCELLED)
    assert not store.file_in_use("file-1") and store.delete_file("file-1") and store.get_file("file-1") is None
    assert [e.seq for e in store.events(job.id, limit=1)] == [store.events(job.id)[0].seq]
    store.close()
