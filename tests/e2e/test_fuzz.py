"""Property-based fuzzing (schemathesis) of the server's OpenAPI document, with a real sandbox's id
for the sandbox-scoped routes, and of execd with upstream's document (harness/fuzz.py says which
checks run and why a few are off): zero 5xx, the conformance checks pass, nothing left behind.

A bounded number of examples per operation keeps this under two minutes here; `bench/fuzz_bench.py`
runs the same with many more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import fuzz
from harness.server_process import ServerProcess, running_server

EXAMPLES = 8
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Local runtime (a jail per sandbox), with an API key; the fuzzer's creates start jails too."""
    with running_server(tmp_path_factory.mktemp("fuzzed"), api_key=KEY, extra_config="warmPoolSize = 1") as server:
        yield server


def _create(server: ServerProcess) -> str:
    body = {"image": {"uri": server.image}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600}
    response = httpx.post(f"{server.url}/v1/sandboxes", json=body, headers=server.headers(), timeout=60)
    assert response.status_code == 202, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def _remove_everything(server: ServerProcess) -> None:
    listed = httpx.get(f"{server.url}/v1/sandboxes", params={"pageSize": 200}, headers=server.headers()).json()
    for item in listed["items"]:
        httpx.delete(f"{server.url}/v1/sandboxes/{item['id']}", headers=server.headers(), timeout=30)


def test_the_server_survives_fuzzing_and_matches_its_document(fuzzed: ServerProcess, tmp_path: Path) -> None:
    sandbox_id = _create(fuzzed)
    try:
        result = fuzz.run(
            f"{fuzzed.url}/openapi.json",
            fuzz.server_config(sandbox_id),
            tmp_path / "server",
            headers=fuzzed.headers(),
            max_examples=EXAMPLES,
        )
        assert result.ok, result.tail()
        assert result.generated > 300 and result.passed == result.generated, result.tail(1500)
        assert "Server error" not in result.output
        # The sandbox the run used is still healthy after it (once resumed: the run fuzzes pause too).
        httpx.post(f"{fuzzed.url}/v1/sandboxes/{sandbox_id}/resume", headers=fuzzed.headers(), timeout=30)
        ping = httpx.get(f"{fuzzed.url}/v1/sandboxes/{sandbox_id}/proxy/44772/ping", headers=fuzzed.headers())
        assert ping.status_code == 200
    finally:
        _remove_everything(fuzzed)
    assert (
        fuzzed.sandboxes_on_host() - {p.name for p in (fuzzed.state_dir / "sandboxes").iterdir() if _warm(p)} == set()
    )


def _warm(directory: Path) -> bool:
    """A warm jail (started ahead of creates, claimed by none) is the runtime's, not a leftover."""
    record = directory / "sandbox.json"
    return record.exists() and '"claimed": false' in record.read_text()


def test_execd_survives_fuzzing_and_matches_upstreams_document(fuzzed: ServerProcess, tmp_path: Path) -> None:
    """execd inside a jail (the fuzzer deletes and moves files at random: never on this host's)."""
    sandbox_id = _create(fuzzed)
    try:
        endpoint = httpx.get(f"{fuzzed.url}/v1/sandboxes/{sandbox_id}/endpoints/44772", headers=fuzzed.headers()).json()
        result = fuzz.run(
            fuzz.execd_document(tmp_path / "execd-api.json"),
            fuzz.EXECD_CONFIG,
            tmp_path / "execd",
            base_url=f"http://{endpoint['endpoint']}",
            headers=endpoint["headers"],
            max_examples=EXAMPLES,
        )
        assert result.ok, result.tail()
        assert result.generated > 200 and result.passed == result.generated, result.tail(1500)
        sessions = httpx.post(f"http://{endpoint['endpoint']}/session", json={}, headers=endpoint["headers"])
        assert sessions.status_code in (200, 429)  # execd still answers; the session cap holds
    finally:
        httpx.delete(f"{fuzzed.url}/v1/sandboxes/{sandbox_id}", headers=fuzzed.headers(), timeout=30)
