"""``Stopper``: a block ended early by a callback, and nothing else cancelled."""

from __future__ import annotations

import asyncio

import pytest

from rooms.socket import Stopper

pytestmark = pytest.mark.anyio


async def test_stop_from_a_callback_ends_the_block_and_the_task_goes_on() -> None:
    stopper = Stopper()
    steps: list[str] = []

    async def body() -> None:
        async with stopper:
            steps.append("in")
            await asyncio.sleep(30)
            steps.append("never")
        steps.append("after")
        await asyncio.sleep(0.01)  # no cancellation left over for later awaits
        steps.append("still running")

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_soon(stopper.stop)
    await asyncio.wait_for(task, 2)
    assert steps == ["in", "after", "still running"]


async def test_stop_before_the_block_ends_it_at_its_first_wait() -> None:
    stopper = Stopper()
    stopper.stop()
    reached: list[str] = []
    async with stopper:
        reached.append("entered")
        await asyncio.sleep(30)
        reached.append("never")
    assert reached == ["entered"]


async def test_stop_after_the_block_and_twice_do_nothing() -> None:
    stopper = Stopper()
    async with stopper:
        await asyncio.sleep(0)
    stopper.stop()
    stopper.stop()
    await asyncio.sleep(0.01)  # would raise CancelledError if stop() had cancelled us


async def test_stop_inside_the_running_task_twice_is_one_stop() -> None:
    stopper = Stopper()
    async with stopper:
        stopper.stop()
        stopper.stop()
        await asyncio.sleep(30)
    await asyncio.sleep(0)


async def test_someone_elses_cancellation_still_cancels() -> None:
    stopper = Stopper()
    started = asyncio.Event()

    async def body() -> None:
        async with stopper:
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_both_stop_and_an_outer_cancel_leave_the_task_cancelled() -> None:
    stopper = Stopper()
    started = asyncio.Event()

    async def body() -> None:
        async with stopper:
            started.set()
            await asyncio.sleep(30)
        await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await started.wait()
    stopper.stop()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_errors_in_the_block_pass_through() -> None:
    stopper = Stopper()
    with pytest.raises(ValueError, match="boom"):
        async with stopper:
            raise ValueError("boom")
    with pytest.raises(TimeoutError):
        async with Stopper():
            raise TimeoutError  # not ours: not swallowed
