"""The rollout driver inside ``keybroker serve``: :meth:`Orchestrator.step` on a timer.

Every replica runs one. That is safe because each step is one transaction per
batch of links with a compare-and-set on every link record (and ``SKIP
LOCKED`` on PostgreSQL), so two replicas never apply the same step twice; it
is useful because a rollout keeps moving as long as any replica is up.

The step runs in a worker thread (it is blocking database work) and the loop
in the event loop. After a step that delivered something, the loop wakes this
process's long-polls at once and, with a bus, every other replica's: the
agents waiting on ``GET /v1/deliveries?wait=…`` get their key without waiting
for their next look at the database.

The loop must outlive any failure: a database that is down, a bug, a step the
broker refuses. It logs the failure by its type only (a database driver's
message may carry SQL parameters, and those may be sealed keys; a
:class:`KeybrokerError`'s message never carries key material, so that one is
logged too), waits longer after each failure in a row (up to
:data:`MAX_BACKOFF`), and tries again. On shutdown it lets the step in flight
finish (so the broker closes after it), up to ``shutdown_grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from keybroker.api.auth import ApiContext
from keybroker.errors import ConfigurationError, KeybrokerError
from keybroker.flows.rotation.orchestrator import Orchestrator, StepReport

logger = logging.getLogger("keybroker.api.rotation")

#: Longest wait between two tries after failures in a row.
MAX_BACKOFF: Final = 30.0


class RotationLoop:
    """``await RotationLoop(ctx, interval).start()`` … ``await loop.close()``."""

    def __init__(
        self,
        ctx: ApiContext,
        interval: float,
        *,
        orchestrator: Orchestrator | None = None,
        shutdown_grace: float = 30.0,
    ) -> None:
        if not interval > 0:
            raise ConfigurationError("the rotation interval must be a positive number of seconds")
        self._ctx = ctx
        self._interval = interval
        self._orchestrator = orchestrator or Orchestrator(ctx.broker)
        self._grace = shutdown_grace
        self._kick = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: Steps done and failures since start (for tests and the curious).
        self.steps = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"RotationLoop(every {self._interval}s)"

    def start(self) -> RotationLoop:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keybroker-rotation-loop")
        return self

    def kick(self) -> None:
        """Step now instead of at the next tick (a rollout was started or retried)."""
        self._kick.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Stop after the step in flight, if any (cancelled after ``shutdown_grace``)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._kick.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self._grace)
        except TimeoutError:
            logger.warning("rotation step still running at shutdown; cancelled")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._kick.clear()
            try:
                report = await asyncio.to_thread(self._orchestrator.step)
                await self._after(report)
            except Exception as exc:  # the loop must not die, whatever a step does
                failures += 1
                self.failures += 1
                delay = min(MAX_BACKOFF, self._interval * 2**failures)
                logger.error(
                    "rotation step failed (%s); trying again in %.1f s", _describe(exc), delay
                )
            else:
                failures = 0
                self.steps += 1
                delay = self._interval
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=delay)

    async def _after(self, report: StepReport) -> None:
        if report.errors:
            logger.warning("rotation step: %d link(s) refused by the broker", report.errors)
        if not report.delivered_to:
            return
        self._ctx.waker.wake()
        if self._ctx.wakeups is not None:
            await self._ctx.wakeups.notify()


def _describe(exc: BaseException) -> str:
    """What may be logged of a failure (see the module docstring)."""
    if isinstance(exc, KeybrokerError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
