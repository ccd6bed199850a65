"""Torch work off the engine thread: each call in a thread of its own, which has ended when the call returns."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.engine.threads import in_thread, run_in_thread


def where() -> threading.Thread:
    return threading.current_thread()


def fail() -> None:
    raise ValueError("bad adapter")


def test_run_in_thread_returns_from_a_thread_that_has_ended():
    thread = run_in_thread(where)
    assert thread is not threading.current_thread() and not thread.is_alive()
    assert run_in_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad adapter"):
        run_in_thread(fail)


def test_in_thread_returns_from_a_thread_that_has_ended():
    async def main():
        threads = await asyncio.gather(*(in_thread(where) for _ in range(3)))
        with pytest.raises(ValueError, match="bad adapter"):
            await in_thread(fail)
        return threads

    threads = asyncio.run(main())
    assert len({id(t) for t in threads}) == 3  # a new thread each time, never a pooled one
    for t in threads:
        t.join(5)
        assert t is not threading.current_thread() and not t.is_alive()
