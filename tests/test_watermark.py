"""The wait primitive behind the server's projection and console index: shutdown never hangs."""

from __future__ import annotations

import asyncio

from cellos.server.watermark import Watermark


def test_waiters_wake_on_advance_and_time_out_otherwise() -> None:
    async def go() -> None:
        mark = Watermark()
        waiter = asyncio.create_task(mark.wait(3, timeout=5))
        await asyncio.sleep(0)
        mark.advance(2)
        await asyncio.sleep(0)
        assert not waiter.done()
        mark.advance(3)
        assert await waiter is True
        mark.advance(1)  # never backwards
        assert mark.value == 3
        assert await mark.wait(4, timeout=0.05) is False
        assert await mark.wait(3, timeout=0) is True

    asyncio.run(go())


def test_close_releases_every_waiter_and_later_waits() -> None:
    async def go() -> None:
        mark = Watermark()
        waiters = [asyncio.create_task(mark.wait(10, timeout=None)) for _ in range(5)]
        await asyncio.sleep(0)
        mark.close()
        assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [False] * 5
        assert await asyncio.wait_for(mark.wait(10, timeout=None), 1) is False

    asyncio.run(go())


def test_a_cancelled_waiter_ends_at_once_while_others_keep_waiting() -> None:
    """Regression: `cellos serve` hung on SIGTERM in a subscription callback cancelled while
    it waited on an asyncio.Condition; a cancelled wait must finish within one loop turn."""

    async def go() -> None:
        mark = Watermark()
        cancelled = asyncio.create_task(mark.wait(1, timeout=30))
        other = asyncio.create_task(mark.wait(1, timeout=30))
        await asyncio.sleep(0)
        cancelled.cancel()
        done, _ = await asyncio.wait({cancelled}, timeout=1)
        assert done == {cancelled} and cancelled.cancelled()
        mark.advance(1)
        assert await asyncio.wait_for(other, 1) is True

    asyncio.run(go())
