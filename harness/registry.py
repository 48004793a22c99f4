"""The test cluster's container registries (tools/registry.sh): HTTPS with a certificate of the cluster's
CA, at the real node's bridge address, so podman on the host pushes and the node's containerd pulls.

`tools/node.sh up` starts the default one (`cluster_registry`, open); a test that needs htpasswd auth
starts its own (`private_registry`, on another port) and stops it afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.paths import ROOT, TOOLS

STATE = ROOT / ".cluster"
CA = STATE / "pki" / "ca.crt"
DEFAULT = "registry"


@dataclass(frozen=True)
class Registry:
    name: str
    address: str  # HOST:PORT, as image references and containerd name it
    credentials: tuple[str, str] | None = None

    @property
    def ca(self) -> Path:
        return CA

    def reference(self, repository: str, tag: str) -> str:
        return f"{self.address}/{repository}:{tag}"

    def client(self, credentials: tuple[str, str] | None = None) -> httpx.Client:
        """An HTTPS client of the registry API, verifying the cluster CA; `credentials` (default: the
        registry's own) for basic auth."""
        auth = credentials or self.credentials
        verify = ssl.create_default_context(cafile=str(self.ca))
        return httpx.Client(base_url=f"https://{self.address}", verify=verify, auth=auth, timeout=30)

    def push(self, image: str, reference: str, credentials: tuple[str, str] | None = None) -> None:
        """Tag a podman image as `reference` and push it (podman trusts the cluster CA for this push only)."""
        subprocess.run(["podman", "tag", image, reference], check=True, capture_output=True)
        creds = credentials or self.credentials
        args = ["podman", "push", "--cert-dir", str(_cert_dir()), "--quiet"]
        if creds:
            args += ["--creds", f"{creds[0]}:{creds[1]}"]
        pushed = subprocess.run([*args, reference], capture_output=True, text=True, check=False)
        subprocess.run(["podman", "rmi", reference], capture_output=True, check=False)
        if pushed.returncode != 0:
            raise RuntimeError(f"podman push {reference} failed: {pushed.stderr[-2000:]}")

    def tags(self, repository: str) -> list[str]:
        with self.client() as client:
            answer = client.get(f"/v2/{repository}/tags/list")
            answer.raise_for_status()
            return list(answer.json().get("tags") or [])

    def pull_secret(self, name: str, credentials: tuple[str, str]) -> dict[str, Any]:
        """A kubernetes.io/dockerconfigjson Secret for this registry with these credentials."""
        user, password = credentials
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        config = {"auths": {self.address: {"username": user, "password": password, "auth": token}}}
        data = base64.b64encode(json.dumps(config).encode()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": data},
        }


def _cert_dir() -> Path:
    """A directory holding only the cluster CA as ca.crt (what podman's --cert-dir reads)."""
    path = STATE / "registries" / "podman-certs"
    path.mkdir(parents=True, exist_ok=True)
    (path / "ca.crt").write_bytes(CA.read_bytes())
    return path


def _registry_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOLS / "registry.sh"), *args], cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
        capture_output=True, check=False,
    )  # fmt: skip


def cluster_registry() -> Registry:
    """The default registry (started by tools/node.sh up, so with the `node` fixture); open."""
    result = _registry_sh("up", DEFAULT)
    if result.returncode != 0:
        raise RuntimeError(f"tools/registry.sh up failed:\n{result.stderr[-4000:]}")
    return Registry(DEFAULT, _registry_sh("address", DEFAULT).stdout.strip())


@contextmanager
def private_registry(name: str, port: int, credentials: tuple[str, str] | None = None) -> Iterator[Registry]:
    """A registry of the caller's own on `port` (htpasswd auth with `credentials`), stopped afterwards."""
    env = {"OSB_REGISTRY_PORT": str(port)}
    if credentials:
        env["OSB_REGISTRY_HTPASSWD"] = f"{credentials[0]}:{credentials[1]}"
    _registry_sh("down", name)  # one left from an interrupted run would keep its old settings
    result = _registry_sh("up", name, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"tools/registry.sh up {name} failed:\n{result.stderr[-4000:]}")
    try:
        yield Registry(name, _registry_sh("address", name).stdout.strip(), credentials)
    finally:
        _registry_sh("down", name)
