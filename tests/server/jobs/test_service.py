"""The job service without HTTP: files checked on arrival, every problem of a job in one refusal, conflicts."""

from __future__ import annotations

import io
import json

import pytest

from adapters.tiers.registry import AdapterRegistry
from adapters.tiers.store import AdapterStore
from adapters.training.config import Hyperparameters
from server.catalog import AdapterCatalog
from server.jobs.config import JobsConfig
from server.jobs.service import Conflict, JobRefused, JobRequest, JobService, NotFound
from server.jobs.store import JobStore

LINES = [{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}]  # fmt: skip
SHAPES = {f"model.layers.{i}.self_attn.{p}": (64, 64) for i in range(2) for p in ("q_proj", "v_proj")}


@pytest.fixture
def service(tmp_path):
    catalog = AdapterCatalog(AdapterStore(tmp_path / "adapters"), AdapterRegistry(), "tiny", SHAPES, 16, lambda: None)
    store = JobStore(tmp_path / "jobs.db")
    svc = JobService(store, tmp_path, JobsConfig(max_train_steps=100, max_job_seconds=600), 5.0,
                     model_path=lambda: None, catalog=lambda: catalog)  # fmt: skip
    yield svc
    store.close()


def jsonl(lines) -> io.BytesIO:
    return io.BytesIO("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode())


def test_files_are_checked_kept_and_deleted(service, tmp_path):
    record = service.add_file(jsonl(LINES * 5), "../../train.jsonl", "fine-tune")
    assert record.examples == 10 and record.filename == "train.jsonl" and service.file_path(record.id).exists()
    with pytest.raises(JobRefused) as e:
        service.add_file(jsonl(['{"prompt": 1}', "not json", *LINES]), "bad.jsonl", "fine-tune")
    assert e.value.param == "file" and "line 1" in str(e.value) and "line 2" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f"{record.id}.jsonl"]  # nothing else kept
    with pytest.raises(JobRefused):
        service.add_file(jsonl(LINES), "x.jsonl", "assistants")
    service.create(JobRequest(training_file=record.id, adapter_name="a"))
    with pytest.raises(Conflict):
        service.delete_file(record.id)  # a queued job reads it
    with pytest.raises(NotFound):
        service.delete_file("file-nope")


def test_a_job_is_refused_with_every_problem_at_once(service):
    record = service.add_file(jsonl(LINES * 50), "t.jsonl", "fine-tune")
    hp = Hyperparameters(rank=32, export_rank=64, target_modules=["q_proj", "wte"], n_epochs=50, batch_size=1,
                         dropout=0.1, switch_interval=4, switch_warm_steps=5)  # fmt: skip
    req = JobRequest(training_file="file-nope", validation_file="file-nope2", adapter_name="../x", method="switchlora",
                     hyperparameters=hp, max_seconds=1e6)  # fmt: skip
    with pytest.raises(JobRefused) as e:
        service.create(req)
    text = str(e.value)
    for part in ("adapter_name", "training_file: no file", "validation_file: no file", "rank 32", "export_rank 64",
                 "'wte'", "dropout", "switch_interval", "max_seconds"):  # fmt: skip
        assert part in text, part
    with pytest.raises(JobRefused, match="optimizer steps"):
        service.create(JobRequest(training_file=record.id, adapter_name="long", hyperparameters=hp.model_copy(
            update={"rank": 4, "export_rank": None, "target_modules": None, "dropout": 0.0})))
    with pytest.raises(NotFound) as nf:
        service.create(JobRequest(training_file=record.id, adapter_name="m", model="gpt-4"))
    assert nf.value.what == "model"
    assert service.store.list_jobs() == []


def test_names_in_use_conflict(service):
    record = service.add_file(jsonl(LINES), "t.jsonl", "fine-tune")
    job = service.create(JobRequest(training_file=record.id, adapter_name="same", seed=3))
    assert job.status == "queued" and job.seed == 3 and job.method["hyperparameters"]["alpha"] == 16.0
    with pytest.raises(Conflict, match="already trains"):
        service.create(JobRequest(training_file=record.id, adapter_name="same"))
    with pytest.raises(NotFound):
        service.get_job("ftjob-nope")


def test_training_runs_on_the_cpu_unless_told_otherwise(service, tmp_path):
    record = service.add_file(jsonl(LINES), "t.jsonl", "fine-tune")
    job = service.create(JobRequest(training_file=record.id, adapter_name="d"))
    service.supervisor.model_path = lambda: str(tmp_path)
    assert service.supervisor.spec_of(job)["device"] == "cpu"
    service.supervisor.config = JobsConfig(training_device="cuda")
    assert service.supervisor.spec_of(job)["device"] == "cuda"
