"""Background loops that stop when they are told to.

On Python 3.11, `asyncio.timeout` and `asyncio.wait_for` can turn a cancellation that arrives
just as their timeout fires into a TimeoutError, which a polling loop then takes for an
ordinary timeout: the loop goes on, and whoever cancelled it waits for ever (a service's
shutdown hung that way). Every periodic loop calls `stop_if_cancelled()` once per round.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
