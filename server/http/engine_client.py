"""How the OpenAI layer reaches an engine: `run` starts one request's choices and yields (choice, output) as they come.

`LocalEngine` runs them on this process's `AsyncEngine`; `server.ray.routing.RemoteEngine` sends them to an engine
replica of a Ray Serve application (whose replica runs them on its own `LocalEngine`). Either raises `Overloaded`
before its first output when it cannot take them; closing the iterator early aborts every choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from server.engine.async_engine import AsyncEngine
from server.engine.request import AdapterUse, RequestOutput
from server.engine.sampling import SamplingParams


class EngineClient(Protocol):
    max_waiting: int
    """The most engine requests (choices) one API request may start."""

    def run(self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[AdapterUse]
            ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        """Choice i generates from `prompts[i]` with `params[i]`; all apply `adapters`."""
        ...


class LocalEngine:
    """The engine of this process. Its requests count against the engine's queue from the moment they are checked
    until the engine has them, so that concurrent requests cannot overshoot `max_waiting`."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._reserved = 0  # engine requests checked against the queue but not yet submitted

    @property
    def max_waiting(self) -> int:
        return self.engine.max_waiting

    async def run(self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[AdapterUse]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        self.engine.check_capacity(len(params) + self._reserved)
        queue: asyncio.Queue = asyncio.Queue()
        gens = [self.engine.generate(p, sp, adapters) for p, sp in zip(prompts, params)]
        unsubmitted = [len(gens)]  # reserved until each pump submits its request
        self._reserved += len(gens)

        async def pump(i: int, gen) -> None:
            unsubmitted[0] -= 1
            self._reserved -= 1  # no await until `generate` has submitted: the engine counts it from here
            try:
                async for out in gen:
                    await queue.put((i, out))
            except Exception as e:  # still an answer for this choice, never a hang
                await queue.put((i, RequestOutput("", "", [], None, "error", 0, 0, f"internal error: {e.__class__.__name__}")))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        done = 0
        try:
            while done < len(tasks):
                i, out = await queue.get()
                done += out.finish_reason is not None
                yield i, out
        finally:
            self._reserved -= unsubmitted[0]  # pumps cancelled before they ran
            unsubmitted[0] = 0
            for t in tasks:
                t.cancel()
            # a cancelled pump closes its generator, which aborts the request in the engine
            await asyncio.gather(*tasks, return_exceptions=True)
