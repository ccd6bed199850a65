"""The job supervisor: queued jobs start in worker processes (or Ray tasks, `server.ray.jobs`), one at a time by
default.

An asyncio task of the server. It starts queued jobs (oldest first) while fewer than
`max_jobs` run, copies each worker's events into the job store, and gives every job exactly one
final state: `succeeded` once its adapter is validated and registered like an upload (servable
at once), `cancelled`, or `failed` with the reason. A server shutdown asks running workers to
checkpoint and stop; their jobs go back to `queued` and resume from that checkpoint on the
next start. A job found `running` at start (the server died under it) resumes from its last
checkpoint, or fails saying why it cannot.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue as queue_mod
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.training.config import TrainConfig
from server.jobs import worker
from server.jobs.config import JobsConfig
from server.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, IllegalTransition, JobRecord, JobStore

log = logging.getLogger(__name__)
_TRAIN_FIELDS = set(TrainConfig.model_fields)
_POLL = 0.2


@dataclass
class _Active:
    job: JobRecord
    process: Any
    events: Any
    cancel: Any
    shutdown: Any
    started: float
    result: dict | None = None
    over_time: bool = False  # killed by the runner: past its wall-clock limit and not stopping by itself
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ProcessLauncher:
    """Each job in a worker process of this machine (multiprocessing's spawn). A launcher returns the worker's
    handles (process, events, cancel, shutdown) as `multiprocessing` makes them; `server.ray.jobs` has a Ray task's."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")

    def launch(self, spec: dict[str, Any], name: str) -> tuple[Any, Any, Any, Any]:
        events = self._ctx.Queue()
        cancel, shutdown = self._ctx.Event(), self._ctx.Event()
        process = self._ctx.Process(target=worker.main, args=(spec, events, cancel, shutdown), name=name, daemon=True)
        process.start()
        return process, events, cancel, shutdown


def _metrics(m: dict | None) -> dict:
    """A checkpoint's metrics as OpenAI names them: step, train_loss, valid_loss."""
    m = m or {}
    out = {"step": m.get("step"), "train_loss": m.get("train_loss")}
    return out | ({"valid_loss": m["eval_loss"]} if m.get("eval_loss") is not None else {})


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


class JobSupervisor:
    def __init__(self, store: JobStore, root: Path, config: JobsConfig, stop_timeout: float,
                 model_path: Callable[[], str | None], register: Callable[[JobRecord, Path], Awaitable[str | None]],
                 launcher: ProcessLauncher | None = None):
        """`root`: per-job working directories (checkpoint, exported adapter) and the training files;
        `stop_timeout`: seconds a worker gets to checkpoint and exit at shutdown, or to stop by itself once past its
        job's wall-clock limit, before it is killed; `model_path()` is the base model's directory once it is loaded
        (None before); `register(job, adapter_dir)` validates and registers a trained adapter, returning a problem
        or None; `launcher` starts a job's worker (default: a local process)."""
        self.store, self.root, self.config, self.stop_timeout = store, root, config, stop_timeout
        self.model_path, self.register = model_path, register
        self.launcher = launcher or ProcessLauncher()
        self.active: dict[str, _Active] = {}
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loraplex-jobs")

    async def stop(self) -> None:
        """Ask running workers to checkpoint and stop (their jobs are queued again), then end the task."""
        self._stopping = True
        for a in self.active.values():
            a.shutdown.set()
        deadline = time.monotonic() + self.stop_timeout
        while self.active and time.monotonic() < deadline:
            await self._poll()
            await asyncio.sleep(_POLL)
        for a in list(self.active.values()):  # did not stop in time: the next start resumes or fails it
            a.process.kill()
            a.process.join(5)
        if self._task:
            self._task.cancel()

    def notify(self) -> None:
        """A job was queued: look at the queue now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while self.model_path() is None:
            await asyncio.sleep(_POLL)
        self._recover()
        while not self._stopping:
            try:
                await self._poll()
                self._start_queued()
            except Exception:  # the runner must outlive any one job's trouble
                log.exception("job runner step failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), _POLL)
            except asyncio.TimeoutError:
                pass

    def _recover(self) -> None:
        """Jobs left `running` by a server that died: resume from a checkpoint, else fail with the reason."""
        for job in self.store.list_jobs(RUNNING):
            if self._has_checkpoint(job.id):
                self.store.transition(job.id, QUEUED)
                self.store.add_event(job.id, "warning", "The server restarted; the job resumes from its last checkpoint.")
            else:
                self._fail(job.id, "server_restarted",
                           "The server stopped while the job was running, before it wrote a checkpoint to resume from.")

    def _has_checkpoint(self, job_id: str) -> bool:
        ckpt = self.job_dir(job_id) / "checkpoint"
        return ckpt.is_dir() and any(ckpt.iterdir())

    # --- starting ------------------------------------------------------------------------

    def _start_queued(self) -> None:
        for job in self.store.list_jobs(QUEUED):
            if len(self.active) >= self.config.max_concurrent_jobs or self._stopping:
                return
            try:
                job = self.store.transition(job.id, RUNNING, started_at=job.started_at or int(time.time()))
            except IllegalTransition:  # cancelled meanwhile
                continue
            self._spawn(job)

    def spec_of(self, job: JobRecord) -> dict[str, Any]:
        """The worker's TrainConfig fields (plus threads and time budget) for `job`."""
        hp = {k: v for k, v in job.method.get("hyperparameters", {}).items() if k in _TRAIN_FIELDS and v is not None}
        work = self.job_dir(job.id)
        return hp | {
            "model": self.model_path(),
            "train_file": str(self.file_path(job.training_file)),
            "validation_file": str(self.file_path(job.validation_file)) if job.validation_file else None,
            "out_dir": str(work / "adapter"),
            "checkpoint_dir": str(work / "checkpoint"),
            "method": job.trainer_method,
            "device": self.config.training_device,
            "seed": job.seed,
            "threads": self.config.training_threads,
            "nice": self.config.training_nice,
            "max_seconds": job.max_seconds,
            "seconds_used": job.seconds_used,
        }

    def _spawn(self, job: JobRecord) -> None:
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        process, events, cancel, shutdown = self.launcher.launch(self.spec_of(job), f"loraplex-train-{job.id}")
        if job.cancel_requested:
            cancel.set()
        self.active[job.id] = _Active(job, process, events, cancel, shutdown, time.monotonic())
        self.store.add_event(job.id, "info", f"Training started ({job.trainer_method}, "
                             f"{job.total_steps} steps)", {"total_steps": job.total_steps})
        log.info("job %s started: %s adapter %s, %d steps (worker pid %d)", job.id, job.trainer_method,
                 job.adapter_name, job.total_steps, process.pid)  # fmt: skip

    # --- watching ------------------------------------------------------------------------

    async def _poll(self) -> None:
        for job_id, a in list(self.active.items()):
            self._drain(a)
            if a.process.is_alive():
                # the worker checks its time budget after every optimizer step; one starved of CPU or stuck in a
                # step for longer than stop_timeout past the limit is stopped here, so the limit holds regardless
                past = time.monotonic() - a.started - (a.job.max_seconds - a.job.seconds_used)
                if past > self.stop_timeout and not a.over_time:
                    a.over_time = True
                    a.process.kill()
                continue
            a.process.join()
            self._drain(a)
            del self.active[job_id]
            try:
                await self._finish(a)
            except Exception:
                log.exception("finishing job %s failed", job_id)
                self._fail(job_id, "internal_error", "The server could not finish the job.")
            a.done.set()

    def _drain(self, a: _Active) -> None:
        while True:
            try:
                msg = a.events.get_nowait()
            except queue_mod.Empty:
                return
            except (EOFError, OSError, ValueError):  # the worker died mid-message
                return
            if msg.pop("kind") == "result":
                a.result = msg
            else:
                self._record_event(a, msg)

    def _record_event(self, a: _Active, event: dict) -> None:
        kind = event.pop("type", "info")
        used = a.job.seconds_used + time.monotonic() - a.started
        if kind == "step":
            message = (f"Step {event['step']}/{event['total_steps']}: training loss={event['loss']:.4f}, "
                       f"learning rate={event['learning_rate']:.3g}")
            self.store.add_event(a.job.id, "info", message, event)
            metrics = (a.job.metrics or {}) | {"step": event["step"], "total_steps": event["total_steps"],
                                               "train_loss": event["mean_loss"]}  # as the final result defines it
            a.job.metrics = metrics
            self.store.update_progress(a.job.id, trained_tokens=event.get("trained_tokens", 0), metrics=metrics,
                                       seconds_used=used)
        elif kind == "eval":
            a.job.metrics = (a.job.metrics or {}) | {"eval_loss": event["eval_loss"]}
            self.store.add_event(a.job.id, "info", f"Step {event['step']}: validation loss={event['eval_loss']:.4f}", event)
        elif kind == "checkpoint":
            self.store.add_event(a.job.id, "info", f"Checkpoint saved at step {event['step']}",
                                 {"step": event["step"], "checkpoint": True, "metrics": _metrics(a.job.metrics)})
            self.store.update_progress(a.job.id, trained_tokens=a.job.trained_tokens, metrics=a.job.metrics or {},
                                       seconds_used=used)
        else:
            self.store.add_event(a.job.id, "info", str(event.get("message", kind)), event or None)

    async def _finish(self, a: _Active) -> None:
        job_id, r = a.job.id, a.result
        used = a.job.seconds_used + time.monotonic() - a.started
        if r is None and a.over_time:
            self._fail(job_id, "time_limit", f"The job exceeded its wall-clock limit of {a.job.max_seconds:.0f} s; "
                       f"its worker did not stop within {self.stop_timeout:.0f} s after it and was stopped.")
            return
        if r is None:
            self._fail(job_id, "worker_died", f"The training process exited unexpectedly (exit code {a.process.exitcode}).")
            return
        if r["status"] == "error":
            self._fail(job_id, "training_failed", r["message"])
            return
        metrics = (a.job.metrics or {}) | {k: r[k] for k in ("train_loss", "eval_loss", "energy_retained", "steps",
                                                             "total_steps") if r.get(k) is not None}
        self.store.update_progress(job_id, trained_tokens=r["trained_tokens"], metrics=metrics, seconds_used=used)
        if r["status"] == "stopped":
            reason = r["reason"]
            if reason == worker.CANCELLED:
                self.store.transition(job_id, CANCELLED)
                self.store.add_event(job_id, "info", f"Job cancelled at step {r['steps']}.")
                log.info("job %s cancelled at step %d", job_id, r["steps"])
                shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            elif reason == worker.TIME_LIMIT:
                self._fail(job_id, "time_limit", f"The job exceeded its wall-clock limit of {a.job.max_seconds:.0f} s.")
            else:  # shutdown (or orphaned): resume from the checkpoint at the next start
                self.store.transition(job_id, QUEUED)
                self.store.add_event(job_id, "info", f"Paused at step {r['steps']} by a server shutdown; "
                                     "the job resumes from its checkpoint when the server starts again.")
            return
        problem = await self.register(a.job, self.job_dir(job_id) / "adapter")
        if problem:
            self._fail(job_id, "registration_failed", f"The trained adapter could not be registered: {problem}")
            return
        self.store.transition(job_id, SUCCEEDED)
        self.store.add_event(job_id, "info", f"Adapter '{a.job.adapter_name}' exported at step {r['steps']}",
                             {"step": r["steps"], "checkpoint": True, "metrics": _metrics(metrics),
                              "fine_tuned_model_checkpoint": a.job.adapter_name})  # fmt: skip
        self.store.add_event(job_id, "info", f"The job succeeded; adapter '{a.job.adapter_name}' is servable.",
                             {"adapter_name": a.job.adapter_name})
        log.info("job %s succeeded: adapter %s servable after %d steps, %.0f s, loss %s", job_id,
                 a.job.adapter_name, r["steps"], used, _fmt(metrics.get("train_loss")))  # fmt: skip
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.store.transition(job_id, FAILED, error={"code": code, "message": message, "param": None})
        log.warning("job %s failed (%s): %s", job_id, code, message)
        self.store.add_event(job_id, "error", message)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    # --- cancel --------------------------------------------------------------------------

    async def cancel(self, job_id: str, wait: float = 15.0) -> JobRecord:
        """Cancel a queued job at once, a running one after its current optimizer step (waiting up to `wait` s)."""
        self.store.request_cancel(job_id)
        a = self.active.get(job_id)
        if a is None:
            try:
                job = self.store.transition(job_id, CANCELLED)
                self.store.add_event(job_id, "info", "Job cancelled before it started.")
                return job
            except IllegalTransition as e:
                if e.status != RUNNING:  # finished already: nothing to cancel
                    raise
                a = self.active.get(job_id)  # started between the two looks
                if a is None:
                    return self.store.get_job(job_id)
        a.cancel.set()
        try:
            await asyncio.wait_for(a.done.wait(), wait)
        except asyncio.TimeoutError:
            pass
        return self.store.get_job(job_id)
