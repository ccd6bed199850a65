"""Training jobs as Ray tasks.

The job supervisor (`server.jobs.supervisor`) runs in the ingress as it runs in a single server, with the same
SQLite record, events, cancel and restart-resume; only its launcher differs. Each job's worker
(`server.jobs.worker.main`, unchanged) runs as a Ray task that declares its resources (`job_num_cpus`,
`job_num_gpus`), on any node that has them, in a worker process of its own (`max_calls=1`: its niceness and thread
count end with it). One small actor per job carries what multiprocessing carries for a local worker: the events the
worker reports, and the cancel and shutdown flags it checks after every optimizer step. The job's files (training
data, checkpoints, the exported adapter) are under the data directory, which every node mounts; the finished adapter
goes through the shared catalog like an upload, so every replica can serve it.
"""

from __future__ import annotations

import queue as queue_mod
from collections import deque
from typing import Any

import ray

from server.jobs import worker


@ray.remote(num_cpus=0)
class _Channel:
    """A job's events (worker → supervisor) and flags (supervisor → worker)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.flags: set[str] = set()

    def put(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    def set(self, flag: str) -> None:
        self.flags.add(flag)

    def is_set(self, flag: str) -> bool:
        return flag in self.flags

    def ping(self) -> None:
        """Answered after every call the caller made before it (an actor runs one caller's calls in order)."""


class _Events:
    """The worker's event queue (`put`), and the supervisor's end of it (`get_nowait`), as multiprocessing's."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self._buffer: deque = deque()

    def __reduce__(self):
        return _Events, (self.channel,)

    def put(self, event: dict) -> None:
        self.channel.put.remote(event)

    def get_nowait(self) -> dict:
        if not self._buffer:
            self._buffer.extend(ray.get(self.channel.drain.remote()))
        if not self._buffer:
            raise queue_mod.Empty
        return self._buffer.popleft()

    def close(self) -> None:
        pass

    def join_thread(self) -> None:
        ray.get(self.channel.ping.remote())  # the last event (the result) has arrived before the task ends


class _Flag:
    """A flag as multiprocessing's Event (`set`, `is_set`)."""

    def __init__(self, channel, name: str) -> None:
        self.channel, self.name = channel, name

    def set(self) -> None:
        ray.get(self.channel.set.remote(self.name))

    def is_set(self) -> bool:
        return ray.get(self.channel.is_set.remote(self.name))


class _Task:
    """The job's Ray task, as the supervisor watches a worker process."""

    def __init__(self, ref: ray.ObjectRef) -> None:
        self.ref = ref
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.ref], timeout=0)
        if ready:
            self._finished()
        return not ready

    def join(self, timeout: float | None = None) -> None:
        ready, _ = ray.wait([self.ref], timeout=timeout)
        if ready:
            self._finished()

    def kill(self) -> None:
        ray.cancel(self.ref, force=True)

    def _finished(self) -> None:
        try:
            ray.get(self.ref)
            self.exitcode = 0
        except Exception:  # the task failed, was cancelled, or its node or worker died
            self.exitcode = 1


@ray.remote(max_calls=1)
def _train(spec: dict[str, Any], events: _Events, cancel: _Flag, shutdown: _Flag) -> None:
    where = ray.get_runtime_context()
    events.put({"kind": "event", "type": "info", "message": f"Running as Ray task {where.get_task_id()} on node "
                f"{where.get_node_id()}", "ray_task_id": where.get_task_id(), "ray_node_id": where.get_node_id()})
    worker.main(spec, events, cancel, shutdown)


class RayLauncher:
    """Starts each job as a Ray task with the resources it declares (the supervisor's `launcher`)."""

    def __init__(self, num_cpus: float, num_gpus: float) -> None:
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def launch(self, spec: dict[str, Any], name: str) -> tuple[_Task, _Events, _Flag, _Flag]:
        channel = _Channel.remote()
        events, cancel, shutdown = _Events(channel), _Flag(channel, "cancel"), _Flag(channel, "shutdown")
        ref = _train.options(name=name, num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(spec, events, cancel, shutdown)
        return _Task(ref), events, cancel, shutdown
