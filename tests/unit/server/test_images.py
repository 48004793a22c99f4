"""Image roots of the local runtime: what podman's inspect tells."""

from opensandbox_platform.server.runtimes import images

INSPECT = [
    {
        "Id": "f05c",
        "Digest": "sha256:f05c021aecff9ebb387c6a8ec898cc28892db4310ac24045831556f4f6011843",
        "Config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "BROKEN"], "WorkingDir": "/app", "Cmd": ["/bin/bash"]},
        "GraphDriver": {
            "Name": "overlay",
            "Data": {"UpperDir": "/s/overlay/top/diff", "LowerDir": "/s/overlay/mid/diff:/s/overlay/base/diff"},
        },
    }
]


def test_an_overlay_image_gives_its_layers_top_first_and_its_defaults() -> None:
    info = images.parse_inspect("localhost/x:1", INSPECT)
    assert info is not None
    assert info.layers == ["/s/overlay/top/diff", "/s/overlay/mid/diff", "/s/overlay/base/diff"]
    assert info.env == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert (info.working_dir, info.entrypoint, info.cmd) == ("/app", [], ["/bin/bash"])
    assert info.key == "f05c021aecff9ebb387c6a8ec898cc28892db4310ac24045831556f4f6011843"
    assert info.describe() == "image localhost/x:1 (sha256:f05c021aecff)"


def test_a_single_layer_and_other_drivers() -> None:
    single = [{**INSPECT[0], "GraphDriver": {"Name": "overlay", "Data": {"UpperDir": "/s/only/diff"}}}]
    info = images.parse_inspect("x", single)
    assert info is not None and info.layers == ["/s/only/diff"]
    assert images.parse_inspect("x", [{**INSPECT[0], "GraphDriver": {"Name": "vfs", "Data": {}}}]) is None
    assert images.parse_inspect("x", []) is None and images.parse_inspect("x", "nonsense") is None


async def test_lookups_are_remembered_for_a_while(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    async def fake_find(ref: str) -> images.ImageInfo | None:
        calls.append(ref)
        return None

    monkeypatch.setattr(images, "find", fake_find)
    lookup = images.Lookup(ttl=60)
    assert await lookup("ubuntu") is None and await lookup("ubuntu") is None
    assert calls == ["ubuntu"]
    expired = images.Lookup(ttl=0)
    await expired("ubuntu")
    await expired("ubuntu")
    assert calls == ["ubuntu", "ubuntu", "ubuntu"]
