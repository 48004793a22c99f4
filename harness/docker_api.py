"""The Docker Engine API (podman's, tools/podman.sh) as the docker runtime's tests and benchmarks reach it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from harness.images import TEST_IMAGE
from harness.paths import DOCKER_SOCKET, EXECD_BINARY

DOCKER_ID_LABEL = "opensandbox.io/id"


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"


def docker_api(method: str, path: str, **kwargs: object) -> httpx.Response:
    """One call to the Docker Engine API (podman's) the docker runtime uses."""
    host = docker_host()
    if not host.startswith("unix://"):
        raise RuntimeError(f"tests speak to a unix socket only, not {host}")
    transport = httpx.HTTPTransport(uds=host.removeprefix("unix://"))
    with httpx.Client(transport=transport, base_url="http://docker/v1.41", timeout=60) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def docker_containers(label: str = DOCKER_ID_LABEL) -> list[dict[str, object]]:
    response = docker_api("GET", "/containers/json", params={"all": "true", "filters": json.dumps({"label": [label]})})
    response.raise_for_status()
    items: list[dict[str, object]] = response.json()
    return items


def docker_unavailable() -> str | None:
    """Why the docker runtime cannot be tested here, or None."""
    try:
        if docker_api("GET", "/_ping").status_code != 200:
            return "the Docker API does not answer"
        if docker_api("GET", f"/images/{TEST_IMAGE}/json").status_code != 200:
            return f"{TEST_IMAGE} is missing (make podman-up)"
    except (httpx.TransportError, RuntimeError) as exc:
        return f"no Docker API at {docker_host()}: {exc} (make podman-up)"
    if not EXECD_BINARY.exists():
        return f"{EXECD_BINARY} is missing (make execd-binary)"
    return None


def remove_recorded_containers(state_dir: Path) -> None:
    """Every sandbox the docker runtime finished creating has a file in its state dir."""
    for path in state_dir.glob("*.json"):
        docker_api("DELETE", f"/containers/sandbox-{path.stem}", params={"force": "true", "v": "true"})
