"""Shutdown that ends every stream cleanly (API.md, Running and Health): SIGTERM drains, then the process exits.

uvicorn's own graceful shutdown closes the listening socket first (new clients get "connection refused") and
cancels whatever still runs when its timeout ends (a stream is cut without an error event or `[DONE]`). So the
first SIGTERM (or SIGINT) starts `drain` instead, while uvicorn keeps serving:
  1. at once, `/health/ready` turns 503 `draining` and every new request is answered 503 with `Retry-After`
     (the socket stays open, so load balancers and clients are told, not refused);
  2. training workers are asked to checkpoint, in parallel;
  3. running requests go on until they finish or the drain deadline (`drain_timeout`) passes; then each one
     still running ends with a 503 (a stream: one error event, then `[DONE]`), and job event streams end too;
  4. then uvicorn shuts down as usual, with nothing left to wait for: the process exits within the drain
     timeout plus a few seconds. A second signal skips what is left and exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from server.http.state import AppState

log = logging.getLogger(__name__)
GRACE = 3.0  # seconds, after the deadline, for ended streams to flush their last events


async def drain(state: AppState, timeout: float) -> None:
    """Drain `state`'s server (steps 1-3 of the module docstring); returns when nothing runs any more."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state.draining = True
    if state.async_engine:
        state.async_engine.draining = True
    log.info("draining: no new requests; %s running", state.serving.active if state.serving else 0)
    jobs = asyncio.create_task(state.job_service.supervisor.stop())
    serving = state.serving
    while serving and serving.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    state.stopping = True
    if serving and serving.active:
        log.warning("drain deadline: ending %d running requests", serving.active)
        serving.shutdown()
        end = loop.time() + GRACE
        while serving.active and loop.time() < end:
            await asyncio.sleep(0.05)
    await jobs


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose first SIGTERM or SIGINT drains the app (`drain`) before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self.should_exit or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: exit now
            if self._drain is not None:
                self.force_exit = True
            return
        self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
        loop = asyncio.get_event_loop()
        self._drain = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self.drain_timeout)
        except Exception:
            log.exception("draining failed")
        self.should_exit = True
