"""services.common.aio.wait_event: a leader loop's wait that never swallows
its task's cancellation (asyncio.wait_for on Python 3.11 can, when the
cancellation arrives as the event fires)."""
from __future__ import annotations

import asyncio

import pytest

from services.common.aio import wait_event


def _loop_cancelled_as_its_event_fires(wait) -> bool:
    """True if a loop that waits with `wait` stops when cancelled the moment its event is set."""

    async def main() -> bool:
        event = asyncio.Event()
        passes = 0

        async def leader() -> None:
            nonlocal passes
            while True:
                await wait(event, 10)
                event.clear()
                passes += 1

        task = asyncio.create_task(leader())
        await asyncio.sleep(0.01)  # the loop waits
        event.set()
        await asyncio.sleep(0)  # the wait's inner future completes...
        task.cancel()  # ...and the lease is lost at that moment
        try:
            await asyncio.wait_for(asyncio.shield(task), 1.0)
        except asyncio.CancelledError:
            return True
        except asyncio.TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        return False
    return asyncio.run(main())


async def _wait_for(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


def test_a_cancelled_loop_stops_even_as_its_event_fires():
    assert _loop_cancelled_as_its_event_fires(wait_event)


def test_the_race_is_real_with_wait_for_on_this_python():
    """The case the helper exists for: if this Python's wait_for no longer
    swallows the cancellation, the helper is merely equivalent."""
    import sys
    if sys.version_info >= (3, 12):
        pytest.skip("wait_for is built on asyncio.timeout from Python 3.12")
    assert not _loop_cancelled_as_its_event_fires(_wait_for)


def test_it_times_out_and_reports_a_set_event():
    async def main():
        event = asyncio.Event()
        assert await wait_event(event, 0.01) is False
        event.set()
        assert await wait_event(event, 0.01) is True
    asyncio.run(main())
