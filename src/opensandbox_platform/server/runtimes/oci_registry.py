"""The few calls of the OCI distribution API that kubernetes snapshots make, over httpx: read a
manifest and a blob, mount or upload a blob, put and delete a manifest.

Why not a library: oras-py (the maintained Python OCI client) pushes artifacts, not an image whose
config and layers are edited, and brings requests and jsonschema into the server's bundle for
what is here a handful of requests. Auth is the registry's challenge: Basic with the credentials,
or a Bearer token fetched from the realm the 401 names (Docker Hub, GHCR, Harbor, distribution
with token auth).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin

import httpx

from opensandbox_platform.server.runtimes import oci_layer

MANIFEST_TYPES = (
    oci_layer.OCI_MANIFEST,
    oci_layer.DOCKER_MANIFEST,
    oci_layer.OCI_INDEX,
    oci_layer.DOCKER_LIST,
)
DOCKER_HUB = "registry-1.docker.io"
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """A registry refused or failed a call; `status` is its HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reference:
    registry: str  # HOST[:PORT]
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, image: str) -> Reference:
        """`registry/repo[:tag][@digest]`; a reference without a registry is Docker Hub's."""
        name, _, digest = image.partition("@")
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = DOCKER_HUB, name if slash else f"library/{name}"
        tag = ""
        if ":" in path.rsplit("/", 1)[-1]:
            path, tag = path.rsplit(":", 1)
        if not path:
            raise ValueError(f"{image!r} is not an image reference")
        return cls(registry, path, tag, digest)

    @property
    def ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.ref}")


def docker_config_auths(raw: bytes) -> dict[str, tuple[str, str]]:
    """The credentials of a `.dockerconfigjson` (a kubernetes.io/dockerconfigjson Secret), by registry."""
    auths: dict[str, tuple[str, str]] = {}
    for host, entry in (json.loads(raw or b"{}").get("auths") or {}).items():
        user, password = entry.get("username"), entry.get("password")
        if (not user or password is None) and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        if user:
            key = host.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
            auths[DOCKER_HUB if key in ("index.docker.io", "docker.io") else key] = (user, password or "")
    return auths


class _ChallengeAuth(httpx.Auth):
    """Answers a registry's 401: Basic with the credentials, or a Bearer token from its realm."""

    def __init__(self, credentials: tuple[str, str] | None) -> None:
        self.credentials = credentials
        self.header: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.header:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic" and self.credentials:
            self.header = httpx.BasicAuth(*self.credentials)._auth_header
        elif scheme == "bearer":
            params = dict(_CHALLENGE.findall(challenge))
            query = {k: params[k] for k in ("service", "scope") if k in params}
            token_request = httpx.Request("GET", params.get("realm", ""), params=query)
            if self.credentials:
                token_request.headers["Authorization"] = httpx.BasicAuth(*self.credentials)._auth_header
            token_response = yield token_request
            if token_response.status_code != 200:
                return
            token_response.read()
            body = token_response.json()
            self.header = f"Bearer {body.get('token') or body.get('access_token')}"
        else:
            return
        request.headers["Authorization"] = self.header
        yield request


class Registry:
    def __init__(
        self,
        host: str,
        *,
        ca_file: str = "",
        credentials: tuple[str, str] | None = None,
        timeout: float = 60,
        transport: httpx.BaseTransport | None = None,  # tests
    ) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.host = host
        self.client = httpx.Client(
            base_url=f"https://{host}",
            verify=verify,
            auth=_ChallengeAuth(credentials),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        if response.status_code not in ok:
            response.read()
            raise RegistryError(response.status_code, f"{what}: {response.status_code} {response.text[:300]}")
        return response

    def manifest(self, repository: str, ref: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index."""
        answer = self._check(
            self.client.get(f"/v2/{repository}/manifests/{ref}", headers={"Accept": ", ".join(MANIFEST_TYPES)}),
            f"GET manifest {repository}:{ref} from {self.host}",
        )
        body = answer.content
        digest = answer.headers.get("Docker-Content-Digest") or f"sha256:{hashlib.sha256(body).hexdigest()}"
        return body, answer.headers.get("Content-Type", "").split(";")[0], digest

    def image_manifest(self, repository: str, ref: str) -> tuple[dict[str, Any], str]:
        """The image manifest (an index resolved to linux/amd64) and its digest."""
        body, media_type, digest = self.manifest(repository, ref)
        manifest = json.loads(body)
        if media_type in (oci_layer.OCI_INDEX, oci_layer.DOCKER_LIST) or "manifests" in manifest:
            return self.image_manifest(repository, oci_layer.pick_platform(manifest))
        return manifest, digest

    def blob(self, repository: str, digest: str) -> bytes:
        return self._check(
            self.client.get(f"/v2/{repository}/blobs/{digest}", follow_redirects=True),
            f"GET blob {digest} of {repository} from {self.host}",
        ).content

    def has_blob(self, repository: str, digest: str) -> bool:
        answer = self.client.head(f"/v2/{repository}/blobs/{digest}", follow_redirects=True)
        return answer.status_code == 200

    def mount(self, repository: str, digest: str, source: str) -> bool:
        """Cross-repository mount of a blob this registry holds; False when it did not (a 202 opens an
        upload instead, which is cancelled)."""
        answer = self.client.post(f"/v2/{repository}/blobs/uploads/", params={"mount": digest, "from": source})
        if answer.status_code == 201:
            return True
        if answer.status_code == 202 and "Location" in answer.headers:
            self.client.delete(self._location(answer))
        return False

    def _location(self, answer: httpx.Response) -> str:
        return urljoin(f"https://{self.host}/", answer.headers["Location"])

    def upload(self, repository: str, digest: str, content: BinaryIO | Iterator[bytes], size: int | None) -> None:
        """One blob: POST an upload, then PUT it whole (a file) or PATCH it as it streams, then PUT."""
        if self.has_blob(repository, digest):
            return
        started = self._check(
            self.client.post(f"/v2/{repository}/blobs/uploads/"), f"start an upload to {repository}", (202,)
        )
        location = self._location(started)
        if size is not None:  # a file of known size: one PUT
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            put = self.client.put(_with_digest(location, digest), content=content, headers=headers)
        else:
            patched = self._check(
                self.client.patch(location, content=content, headers={"Content-Type": "application/octet-stream"}),
                f"upload {digest} to {repository}",
                (202,),
            )
            put = self.client.put(_with_digest(self._location(patched), digest))
        self._check(put, f"finish the upload of {digest} to {repository}", (201,))

    def stream_blob(self, repository: str, digest: str) -> Iterator[bytes]:
        with self.client.stream("GET", f"/v2/{repository}/blobs/{digest}", follow_redirects=True) as answer:
            self._check(answer, f"GET blob {digest} of {repository} from {self.host}")
            yield from answer.iter_bytes(oci_layer.CHUNK)

    def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        answer = self._check(
            self.client.put(f"/v2/{repository}/manifests/{tag}", content=body, headers={"Content-Type": media_type}),
            f"PUT manifest {repository}:{tag}",
            (201,),
        )
        return answer.headers.get("Docker-Content-Digest") or f"sha256:{hashlib.sha256(body).hexdigest()}"

    def delete_manifest(self, repository: str, digest: str) -> bool:
        """False when it was not there."""
        answer = self.client.delete(f"/v2/{repository}/manifests/{digest}")
        if answer.status_code == 404:
            return False
        self._check(answer, f"DELETE manifest {repository}@{digest}", (202, 200))
        return True


def _with_digest(location: str, digest: str) -> str:
    """The upload's URL with `digest` added: its own query (the upload's state) must stay, which
    httpx's `params` would replace."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"
