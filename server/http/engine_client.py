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
    def run(self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[AdapterUse]
            ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        """Choice i generates from `prompts[i]` with `params[i]`; all apply `adapters`."""
        ...


class LocalEngine:
    """The engine of this process."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def run(self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[AdapterUse]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        self.engine.check_capacity(len(params))
        queue: asyncio.Queue = asyncio.Queue()
        gens = [self.engine.generate(p, sp, adapters) for p, sp in zip(prompts, params)]

        async def pump(i: int, gen) -> None:
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
            for t in tasks:
                t.cancel()
            # a cancelled pump closes its generator, which aborts the request in the engine
            await asyncio.gather(*tasks, return_exceptions=True)
