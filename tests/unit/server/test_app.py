import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from harness.ports import free_port
from opensandbox_platform.server.app import create_app


def test_health_answers_200_with_the_runtime_state_and_ready_follows_it() -> None:
    client = TestClient(create_app())
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "runtime": {"type": "local", "ready": True}}
    assert client.get("/ready").json() == {"status": "ready"}


def test_server_program_listens_where_told(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[local]\nstateDir = "{tmp_path / "state"}"\nwarmPoolSize = 0\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "server did not answer within 20 s"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bad_config_file_stops_the_program_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nport = "eighty"\n')
    result = subprocess.run(
        [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "invalid config" in result.stderr
