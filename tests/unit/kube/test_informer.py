"""The informer on a scripted fake API: paging, watch events, relist on 410, restart of a silent watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from opensandbox_platform.kube.client import PODS, KubeError, Resource
from opensandbox_platform.kube.informer import Informer


@dataclass
class Obj:
    key: str
    value: str


def raw(name: str, value: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}, "value": value}


def slim(o: dict[str, Any]) -> Obj:
    return Obj(f"ns/{o['metadata']['name']}", o["value"])


@dataclass
class FakeApi:
    """Each list() answers the next entry of `lists`; each watch() plays the next script of `watches`."""

    lists: list[list[dict[str, Any]]]
    watches: list[list[dict[str, Any] | Exception | float]]
    list_params: list[dict[str, Any]] = field(default_factory=list)
    watch_params: list[dict[str, Any]] = field(default_factory=list)

    async def list(self, res: Resource, namespace: str | None = None, **params: Any) -> dict[str, Any]:
        self.list_params.append(params)
        pages = self.lists[0]
        page_no = int(params.get("continue", 0))
        page = pages[page_no]
        if page_no + 1 < len(pages):
            return {"items": page["items"], "metadata": {"continue": str(page_no + 1)}}
        self.lists.pop(0)
        return {"items": page["items"], "metadata": {"resourceVersion": page["rv"]}}

    async def watch(self, res: Resource, namespace: str | None = None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        self.watch_params.append(params)
        script = self.watches.pop(0) if self.watches else [3600.0]
        for step in script:
            if isinstance(step, Exception):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            yield step


async def run_until(informer: Informer[Obj], check: Any, timeout: float = 2.0) -> None:
    task = asyncio.create_task(informer.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_lists_in_pages_then_applies_watch_events_from_the_list_version() -> None:
    api = FakeApi(
        lists=[[{"items": [raw("a", "1", "5")]}, {"items": [raw("b", "1", "6")], "rv": "10"}]],
        watches=[[
            {"type": "MODIFIED", "object": raw("a", "2", "11")},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
            {"type": "DELETED", "object": raw("b", "1", "13")},
            {"type": "ADDED", "object": raw("c", "1", "14")},
        ]],
    )  # fmt: skip
    seen: list[tuple[str | None, str | None]] = []
    informer = Informer(api, PODS, slim, page_size=1)  # type: ignore[arg-type]
    informer.add_handler(lambda old, new: seen.append((old and old.value, new and new.value)))
    informer.add_index("value", lambda o: [o.value])
    await run_until(informer, lambda: "ns/c" in informer.store)
    assert {k: o.value for k, o in informer.store.items()} == {"ns/a": "2", "ns/c": "1"}
    assert api.watch_params[0]["resourceVersion"] == "10"
    assert api.watch_params[0]["allowWatchBookmarks"] == "true"
    assert [o.key for o in informer.by_index("value", "1")] == ["ns/c"]
    assert seen == [(None, "1"), (None, "1"), ("1", "2"), ("1", None), (None, "1")]
    assert informer.synced.is_set()


async def test_410_gone_relists_and_reports_what_changed_meanwhile() -> None:
    api = FakeApi(
        lists=[
            [{"items": [raw("a", "1", "5"), raw("b", "1", "6")], "rv": "10"}],
            [{"items": [raw("a", "1", "5"), raw("c", "1", "40")], "rv": "50"}],
        ],
        watches=[[KubeError(410, "Expired", "too old resource version")]],
    )
    deleted: list[str] = []
    informer = Informer(api, PODS, slim)  # type: ignore[arg-type]
    informer.add_handler(lambda old, new: deleted.append(old.key) if new is None and old else None)
    await run_until(informer, lambda: "ns/c" in informer.store)
    assert set(informer.store) == {"ns/a", "ns/c"}
    assert deleted == ["ns/b"], "b vanished while we were not watching"
    assert len(api.list_params) == 2


async def test_a_watch_error_event_with_410_relists_too() -> None:
    api = FakeApi(
        lists=[[{"items": [], "rv": "1"}], [{"items": [raw("x", "1", "9")], "rv": "9"}]],
        watches=[[{"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "gone"}}]],
    )
    informer = Informer(api, PODS, slim)  # type: ignore[arg-type]
    await run_until(informer, lambda: "ns/x" in informer.store)


async def test_a_silent_watch_is_restarted_from_the_last_version() -> None:
    api = FakeApi(
        lists=[[{"items": [], "rv": "7"}]],
        watches=[
            [{"type": "ADDED", "object": raw("a", "1", "8")}, 3600.0],  # then silence
            [{"type": "ADDED", "object": raw("b", "1", "9")}],
        ],
    )
    informer = Informer(api, PODS, slim, silence_timeout=0.05)  # type: ignore[arg-type]
    await run_until(informer, lambda: "ns/b" in informer.store)
    assert [p["resourceVersion"] for p in api.watch_params[:2]] == ["7", "8"]
    assert len(api.list_params) == 1, "a restart resumes the watch; it does not relist"


async def test_the_cache_never_goes_back_to_an_older_version() -> None:
    """A write we made is put in at once (assume); a watch event from before it must not undo it."""
    api = FakeApi(lists=[[{"items": [raw("a", "1", "5")], "rv": "5"}]], watches=[[0.05,
                  {"type": "MODIFIED", "object": raw("a", "older", "6")}, 3600.0]])  # fmt: skip
    informer = Informer(api, PODS, slim)  # type: ignore[arg-type]
    task = asyncio.create_task(informer.run())
    await informer.synced.wait()
    informer.assume(raw("a", "ours", "7"))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert informer.store["ns/a"].value == "ours"


async def test_resync_reads_everything_again_and_keeps_what_is_newer() -> None:
    api = FakeApi(
        lists=[[{"items": [raw("a", "1", "5")], "rv": "5"}],
               [{"items": [raw("a", "2", "8"), raw("b", "1", "7")], "rv": "8"}]],
        watches=[[3600.0]],
    )  # fmt: skip
    informer = Informer(api, PODS, slim)  # type: ignore[arg-type]
    task = asyncio.create_task(informer.run())
    await informer.synced.wait()
    informer.assume(raw("c", "created after the snapshot", "9"))
    await informer.resync()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert {k: o.value for k, o in informer.store.items()} == {
        "ns/a": "2",
        "ns/b": "1",
        "ns/c": "created after the snapshot",
    }
