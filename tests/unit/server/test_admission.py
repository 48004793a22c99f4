"""Admission control of creates: slots, the queue, 429 and 503 with Retry-After, clients that leave."""

from __future__ import annotations

import asyncio

import pytest

from opensandbox_platform.server.admission import Admission, ClientGone, default_concurrency
from opensandbox_platform.server.errors import ApiError


async def test_slots_then_queue_in_order_then_429() -> None:
    admission = Admission(concurrency=2, queue_size=2, queue_timeout=5)
    release = asyncio.Event()
    order: list[int] = []

    async def create(n: int) -> None:
        async with admission.slot():
            order.append(n)
            await release.wait()

    running = [asyncio.create_task(create(n)) for n in range(4)]
    await asyncio.sleep(0.01)
    assert admission.running == 2 and admission.waiting == 2 and order == [0, 1]
    with pytest.raises(ApiError) as refused:
        async with admission.slot():
            pass
    assert refused.value.status == 429 and refused.value.code == "SANDBOX::TOO_MANY_CREATES"
    assert int(refused.value.headers["Retry-After"]) >= 1
    release.set()
    await asyncio.gather(*running)
    assert order == [0, 1, 2, 3] and admission.running == 0 and admission.waiting == 0


async def test_a_wait_longer_than_the_queue_timeout_is_503() -> None:
    admission = Admission(concurrency=1, queue_size=4, queue_timeout=0.05)
    async with admission.slot():
        with pytest.raises(ApiError) as busy:
            async with admission.slot():
                pass
    assert busy.value.status == 503 and busy.value.headers["Retry-After"]
    assert admission.running == 0 and admission.waiting == 0
    async with admission.slot():  # nothing leaked: the slot is free again
        assert admission.running == 1


async def test_a_client_that_leaves_while_waiting_creates_nothing_and_frees_its_place() -> None:
    admission = Admission(concurrency=1, queue_size=1, queue_timeout=5)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with admission.slot():
        waiter = asyncio.create_task(admission.slot(gone).__aenter__())
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        gone.set_result(None)
        with pytest.raises(ClientGone):
            await waiter
        assert admission.waiting == 0
    assert admission.running == 0


async def test_a_slot_handed_to_a_cancelled_waiter_passes_on() -> None:
    admission = Admission(concurrency=1, queue_size=2, queue_timeout=5)
    entered: list[str] = []

    async def create(name: str) -> None:
        async with admission.slot():
            entered.append(name)

    async with admission.slot():
        first = asyncio.create_task(create("first"))
        second = asyncio.create_task(create("second"))
        await asyncio.sleep(0.01)
        first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert entered == ["second"] and admission.running == 0


def test_default_concurrency_per_runtime() -> None:
    assert default_concurrency("kubernetes") == 256
    assert 1 <= default_concurrency("local") < default_concurrency("docker")
