"""``InferenceWorker``: one thread runs every model call, in arrival order; ``Deadline``: a request's time.

The event loop only parses requests and sends answers; decoding and the model run on this one
thread. Serialising is what keeps concurrent clients from oversubscribing the CPU: PyTorch
already spreads one forward pass over every core, and two passes at once would each get half
(plus the cost of their threads waiting for each other). A job still waiting when its request
times out is dropped from the queue; a running one is told through its ``Deadline``.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .uploads import RequestError

__all__ = ["Deadline", "InferenceWorker"]

T = TypeVar("T")


class Deadline:
    """The moment a request's time is up (``seconds`` from its start)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def check(self) -> None:
        """``RequestError(504)`` once the time is up; long jobs call it between steps."""
        if time.monotonic() >= self.at:
            raise timed_out(self.seconds)

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable`` within the time left."""
        try:
            return await asyncio.wait_for(awaitable, self.remaining())
        except asyncio.TimeoutError:
            raise timed_out(self.seconds) from None


def timed_out(seconds: float) -> RequestError:
    return RequestError(504, f"the request took longer than the server's {seconds:g} s limit "
                             "(lhcnet serve --timeout); send a smaller input or fewer at once")


class InferenceWorker:
    """Runs ``job()`` on the single inference thread, within the request's ``Deadline``."""

    def __init__(self) -> None:
        self.pending = 0  # jobs queued or running
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lhcnet-inference")

    async def run(self, job: Callable[[], T], deadline: Deadline) -> T:
        def guarded() -> T:
            deadline.check()  # waited in the queue past its time: its client has had the 504
            return job()

        future = asyncio.get_running_loop().run_in_executor(self._executor, guarded)
        self.pending += 1
        future.add_done_callback(lambda _: self._done())
        return await deadline.wait(future)

    def _done(self) -> None:
        self.pending -= 1

    def close(self) -> None:
        """Drop the queued jobs and wait for the running one."""
        self._executor.shutdown(wait=True, cancel_futures=True)
