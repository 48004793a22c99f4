"""The server's stall watch names where a blocked event loop is, and says when it turns again."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from opensandbox_platform.server.stallwatch import StallWatch


def a_blocking_call() -> None:
    time.sleep(1.0)


async def test_a_blocked_loop_is_reported_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "opensandbox.server.stall")
    watch = StallWatch(threshold=0.4)
    watch.start()
    try:
        await asyncio.sleep(0.3)
        assert not caplog.records  # a turning loop is not reported
        a_blocking_call()
        await asyncio.sleep(0.6)
    finally:
        watch.close()
    blocked, turned = [r.getMessage() for r in caplog.records]
    assert "event loop blocked" in blocked and "a_blocking_call" in blocked
    assert "turned again after" in turned
