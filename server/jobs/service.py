"""The job service: what the HTTP routes (and anything else) do with training files and jobs.

A training file is checked line by line when it arrives (every bad line named, with its number) and kept under
an id. A job is checked whole at creation — files, adapter name, rank, target modules, steps and wall-clock
budget against the server's limits, the trainer's own rules — with every problem in one answer, then queued for
the supervisor. A finished job's adapter goes through the adapter catalog exactly as an upload does. Files and
jobs belong to the tenant that created them (`server.tenants`): another tenant finds no such id (an admin finds
all); a job trains only on its tenant's files, and its adapter is its tenant's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from adapters.names import name_problem
from adapters.peft_io import AdapterError
from adapters.tiers.registry import AdapterExists
from adapters.training.config import Hyperparameters, auto_epochs, count_steps, method_problems
from adapters.training.data import DataError, read_jsonl
from server.catalog import AdapterCatalog, AdapterNotOwned
from server.jobs.config import JobsConfig
from server.jobs.store import TERMINAL, TRAINER_METHOD, FileRecord, IllegalTransition, JobRecord, JobStore, new_id
from server.jobs.supervisor import JobSupervisor, ProcessLauncher
from server.tenants import OPERATOR, Tenant

R = TypeVar("R")
log = logging.getLogger(__name__)


class JobRefused(ValueError):
    """A job or file that cannot be accepted; `problems` lists every reason, `param` the field at fault if one."""

    def __init__(self, problems: list[str], param: str | None = None):
        self.problems, self.param = problems, param
        super().__init__("; ".join(problems))


class NotFound(KeyError):
    """No job or file with that id (`what` names which)."""

    def __init__(self, what: str, id: str):
        super().__init__(id)
        self.what, self.id = what, id


class Conflict(RuntimeError):
    """A request that contradicts the current state; `param` names the field at fault."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _found(what: str, id: str, record: R | None, tenant: Tenant = OPERATOR) -> R:
    if record is None or not tenant.owns(record.owner):
        raise NotFound(what, id)
    return record


@dataclass
class JobRequest:
    """A job as the API asks for one (OpenAI's fields, our extensions)."""

    training_file: str
    adapter_name: str | None = None
    """None: a name is made up (`ft-` and 12 hex digits), as OpenAI names a model when no suffix is given."""
    method: str = "lora"
    """lora, switchlora, or OpenAI's supervised (= lora)."""
    hyperparameters: Hyperparameters | None = None
    validation_file: str | None = None
    model: str | None = None
    """The base model's id (OpenAI requires one); None: the served base."""
    seed: int | None = None
    max_seconds: float | None = None
    overwrite: bool = False
    suffix: str | None = None


class JobService:
    def __init__(self, store: JobStore, root: Path, config: JobsConfig, stop_timeout: float,
                 model_path: Callable[[], str | None], catalog: Callable[[], AdapterCatalog | None],
                 launcher: ProcessLauncher | None = None):  # fmt: skip
        """`catalog()` is the adapter catalog once the model is loaded (jobs are created and registered only then);
        `launcher` starts each job's worker (default: a local process)."""
        self.store, self.config, self.catalog = store, config, catalog
        self.supervisor = JobSupervisor(store, root, config, stop_timeout, model_path, self._register_trained, launcher)

    # ---- files ------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.supervisor.file_path(file_id)

    def add_file(self, source: BinaryIO, filename: str, purpose: str, tenant: Tenant = OPERATOR) -> FileRecord:
        """Copy the JSONL upload `source`, check it and keep it under a new id; JobRefused if it is bad (then
        nothing is kept). Blocking I/O."""
        if purpose != "fine-tune":
            raise JobRefused(["purpose must be 'fine-tune'"], "purpose")
        file_id = new_id("file")
        dest = self.file_path(file_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            try:
                examples = len(read_jsonl(Path(tmp), max_examples=self.config.max_training_examples))
            except DataError as e:
                raise JobRefused(["invalid training file: " + "; ".join(e.problems)], "file") from None
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        record = FileRecord(id=file_id, filename=Path(filename).name, bytes=dest.stat().st_size, purpose=purpose,
                            examples=examples, created_at=int(time.time()), owner=tenant.id)  # fmt: skip
        self.store.add_file(record)
        return record

    def get_file(self, file_id: str, tenant: Tenant = OPERATOR) -> FileRecord:
        return _found("file", file_id, self.store.get_file(file_id), tenant)

    def list_files(self, tenant: Tenant = OPERATOR) -> list[FileRecord]:
        return [f for f in self.store.list_files() if tenant.owns(f.owner)]

    def delete_file(self, file_id: str, tenant: Tenant = OPERATOR) -> None:
        self.get_file(file_id, tenant)
        if self.store.file_in_use(file_id):
            raise Conflict(f"the file '{file_id}' is used by a job that has not finished", "file_id")
        self.store.delete_file(file_id)
        self.file_path(file_id).unlink(missing_ok=True)

    # ---- jobs -------------------------------------------------------------------------------

    def get_job(self, job_id: str, tenant: Tenant = OPERATOR) -> JobRecord:
        return _found("job", job_id, self.store.get_job(job_id), tenant)

    def list_jobs(self, tenant: Tenant = OPERATOR) -> list[JobRecord]:
        return [j for j in self.store.list_jobs() if tenant.owns(j.owner)]

    def create(self, req: JobRequest, tenant: Tenant = OPERATOR) -> JobRecord:
        """Check `req` against the loaded model and the limits (JobRefused with every problem; Conflict for a
        name in use) and queue it, owned by `tenant`."""
        catalog, limits = self.catalog(), self.config
        if req.model is not None and req.model != catalog.base_model_id:
            raise NotFound("model", req.model)
        hp = req.hyperparameters or Hyperparameters()
        if req.adapter_name is None:
            req.adapter_name = new_id("ft")[:15]
        param = "suffix" if req.suffix == req.adapter_name else "adapter_name"
        problems = [p for p in [name_problem(req.adapter_name, param)] if p]
        files = {}
        for param in ("training_file", "validation_file"):
            file_id = getattr(req, param)
            if file_id is not None:
                files[param] = self.store.get_file(file_id)
                if files[param] is None or not tenant.owns(files[param].owner):
                    files[param] = None
                    problems.append(f"{param}: no file with id '{file_id}'")
        for key in ("rank", "export_rank"):
            value = getattr(hp, key)
            if value is not None and value > catalog.max_rank:
                problems.append(f"{key} {value} is over this server's maximum of {catalog.max_rank}")
        known = {name.rsplit(".", 1)[-1] for name in catalog.layer_shapes}
        unknown = sorted(set(hp.target_modules or []) - known)
        if unknown:
            problems.append(f"target_modules {unknown} are not linear layers of this model (it has {sorted(known)})")
        problems += method_problems(TRAINER_METHOD.get(req.method, req.method), hp)
        max_seconds = req.max_seconds or limits.max_job_seconds
        if max_seconds > limits.max_job_seconds:
            problems.append(f"max_seconds {max_seconds:g} is over this server's limit of {limits.max_job_seconds:g}")
        total_steps = 0
        if files.get("training_file"):
            if hp.n_epochs is None:  # auto: the job shows what it chose
                hp = hp.model_copy(update={"n_epochs": auto_epochs(files["training_file"].examples)})
            total_steps = count_steps(hp, files["training_file"].examples)
            if total_steps > limits.max_train_steps:
                problems.append(f"this job would take {total_steps} optimizer steps, over this server's limit of "
                                f"{limits.max_train_steps} (lower n_epochs or set max_steps)")  # fmt: skip
        if problems:
            raise JobRefused(problems)
        if catalog.exists(req.adapter_name) and not tenant.owns(catalog.registry.get(req.adapter_name).owner):
            raise Conflict(f"an adapter named '{req.adapter_name}' exists and belongs to another tenant",
                           "adapter_name", "adapter_exists")  # fmt: skip
        if not req.overwrite and catalog.exists(req.adapter_name):
            raise Conflict(f"an adapter named '{req.adapter_name}' exists (set \"overwrite\": true to replace it when "
                           "the job succeeds)", "adapter_name", "adapter_exists")  # fmt: skip
        if any(j.adapter_name == req.adapter_name for j in self.store.list_jobs() if j.status not in TERMINAL):
            raise Conflict(f"a job that has not finished already trains '{req.adapter_name}'", "adapter_name",
                           "adapter_exists")  # fmt: skip
        method = {"type": req.method, "hyperparameters": hp.model_dump(), "overwrite": req.overwrite}
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        job = self.store.add_job(adapter_name=req.adapter_name, method=method, training_file=req.training_file,
                                 validation_file=req.validation_file, seed=seed, total_steps=total_steps,
                                 max_seconds=max_seconds, owner=tenant.id, model=catalog.base_model_id,
                                 suffix=req.suffix)  # fmt: skip
        log.info("job %s created: %s adapter %s, %d steps, tenant %s", job.id, req.method, job.adapter_name,
                 total_steps, tenant.id or "system")  # fmt: skip
        self.supervisor.notify()
        return job

    async def cancel(self, job_id: str, tenant: Tenant = OPERATOR) -> JobRecord:
        """Cancel a queued job at once, a running one after its current optimizer step; Conflict once finished."""
        self.get_job(job_id, tenant)
        try:
            return await self.supervisor.cancel(job_id)
        except IllegalTransition as e:
            raise Conflict(f"the job is {e.status}; only a queued or running job can be cancelled",
                           "fine_tuning_job_id") from None  # fmt: skip

    async def _register_trained(self, job: JobRecord, adapter_dir: Path) -> str | None:
        """The supervisor's `register`: a trained adapter passes an upload's validation, then serves at once."""
        try:
            tenant = Tenant(job.owner, admin=job.owner is None)
            await self.catalog().add_copy(job.adapter_name, adapter_dir, bool(job.method.get("overwrite")), tenant)
            return None
        except AdapterError as e:
            return "; ".join(e.problems)
        except AdapterExists:
            return f"an adapter named '{job.adapter_name}' exists (the job did not ask to overwrite it)"
        except AdapterNotOwned:
            return f"an adapter named '{job.adapter_name}' exists and belongs to another tenant"
        except FileNotFoundError:
            return "the trainer wrote no adapter"
