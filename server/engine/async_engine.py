"""The asyncio face of the engine thread: one async iterator of outputs per request.

Closing the iterator before the request finished (a client that went away, a cancelled task)
aborts it in the engine, which frees its batch row at the next step. Outputs cross from the engine thread to the
event loop in batches: the first output of a step schedules one delivery on the loop and the others join it, so
a step with 16 streams wakes the loop once, not 16 times. Latencies as the caller sees them (time to
first token, time between tokens) go to the observers it passes in.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from server.engine.engine import Engine
from server.engine.request import AdapterUse, GenerationRequest, RequestOutput
from server.engine.sampling import SamplingParams


class Overloaded(RuntimeError):
    """The queue is full or the server is draining."""


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        max_waiting: int,
        on_first_token: Callable[[float], None] = lambda seconds: None,
        on_next_token: Callable[[float], None] = lambda seconds: None,
    ):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_first_token, self.on_next_token = on_first_token, on_next_token
        self.draining = False
        self._lock = threading.Lock()
        # per event loop, the outputs it has not been handed yet
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}

    def _deliver(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, out: RequestOutput) -> None:
        """Called from the engine thread: hand `out` to its event loop, batched with the step's other outputs."""
        with self._lock:
            pending = self._pending.setdefault(loop, [])
            pending.append((queue, out))
            if len(pending) > 1:
                return  # a delivery to that loop is scheduled already
        try:
            loop.call_soon_threadsafe(self._drain, loop)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            with self._lock:
                self._pending.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            pending = self._pending.pop(loop, [])
        for queue, out in pending:
            queue.put_nowait(out)

    def check_capacity(self, requests: int = 1) -> None:
        """Raise Overloaded unless `requests` more can be queued (call before `generate`)."""
        if self.draining:
            raise Overloaded("the server is shutting down")
        if self.engine.num_waiting + requests > self.max_waiting:
            raise Overloaded("the server is overloaded: too many queued requests")

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapters: list[AdapterUse], request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit one request and yield its outputs (after `check_capacity`)."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        emit = partial(self._deliver, asyncio.get_running_loop(), queue)
        rid = request_id or uuid.uuid4().hex
        t0 = last = time.perf_counter()
        self.engine.submit(GenerationRequest(rid, prompt_ids, params, emit, adapters))
        finished = False
        first = True
        try:
            while not finished:
                out = await queue.get()
                now = time.perf_counter()
                if out.token_ids:
                    if first:
                        self.on_first_token(now - t0)
                        first = False
                    else:
                        self.on_next_token(now - last)
                    last = now
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                self.engine.abort(rid)
