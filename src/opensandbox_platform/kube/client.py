"""Raw-JSON access to the Kubernetes API: lightkube's configuration, an aiohttp transport.

lightkube loads kubeconfig or in-cluster config (TLS, client certificates, tokens, exec plugins);
requests go over aiohttp, whose C-accelerated HTTP stack costs about a third of the CPU per request
of httpx's (measured: 0.28 vs 0.8-1.2 ms), which matters when a burst of claims shares two cores
with the API server. We speak JSON dicts, so hot paths (lists and watches of thousands of pods)
never build full model objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from lightkube.config.client_adapter import user_auth, verify_cluster
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import User

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API: `/api/v1/...` or `/apis/<group>/<version>/...`."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


PODS = Resource("", "v1", "pods", "Pod")
EVENTS = Resource("", "v1", "events", "Event")
SECRETS = Resource("", "v1", "secrets", "Secret")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False)
SUBJECT_ACCESS_REVIEWS = Resource(
    "authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", namespaced=False
)


class KubeError(Exception):
    """A non-2xx answer from the API server, with its Status reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def transient(self) -> bool:
        """The API server (or etcd behind it) is overloaded or unwell: the same request may work later."""
        return self.status == 429 or self.status >= 500


def _error(status: int, reason: str, body: bytes) -> KubeError:
    try:
        parsed = json.loads(body)
        return KubeError(status, parsed.get("reason", reason), parsed.get("message", body.decode(errors="replace")))
    except ValueError:
        return KubeError(status, reason, body.decode(errors="replace"))


class Credentials:
    """The Authorization header for a kubeconfig user, refreshed as Kubernetes clients do: a token
    file (in-cluster, rotated by the kubelet) is re-read every minute and after a 401; exec plugins
    and other lightkube auth flows are run again after a 401."""

    def __init__(self, user: User) -> None:
        self.user = user
        self._auth = user_auth(user)
        self._header: str | None = None
        self._read_at = 0.0

    async def header(self, url: str, *, refresh: bool = False) -> str | None:
        if self._auth is None:
            return None
        stale = self.user.token_file is not None and time.monotonic() - self._read_at > 60
        if self._header is None or refresh or stale:
            if self.user.token_file is not None:
                token = Path(self.user.token_file).read_text().strip()  # noqa: ASYNC240 - a tiny tmpfs file, once a minute
                self._header = f"Bearer {token}"
            else:
                if refresh:
                    forget_cached_token(self._auth)
                request = httpx2.Request("GET", url)
                flow = self._auth.async_auth_flow(request)
                await anext(flow)
                await flow.aclose()
                self._header = request.headers.get("Authorization")
            self._read_at = time.monotonic()
        return self._header


def forget_cached_token(auth: httpx2.Auth) -> None:
    """Make lightkube's exec-plugin auth run its plugin again on the next request.

    lightkube's ExecAuth keeps the token in the private `_last_bearer` and runs the plugin again only
    when the server answers 401 inside its own flow; we drive the flow ourselves (our requests go over
    aiohttp), so after our 401 we clear it. tests/unit/kube/test_client.py fails if lightkube renames it."""
    if hasattr(auth, "_last_bearer"):
        auth._last_bearer = None


class KubeClient:
    def __init__(self, session: aiohttp.ClientSession, server: str, credentials: Credentials) -> None:
        self.session = session
        self.server = server.rstrip("/")
        self.credentials = credentials

    @classmethod
    def from_config(
        cls,
        kubeconfig: str | None = None,
        *,
        max_connections: int = 32,
        timeout: float = 30.0,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> KubeClient:
        """From a kubeconfig file, else the in-cluster service account, else $KUBECONFIG/~/.kube/config.

        `timeout` bounds every request but watches (which have their own silence timeout);
        `trace_configs` see every request (the server's engine-call metrics)."""
        config = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
        if config is None or config.user is None:
            raise ValueError("the kubeconfig has no current context with a user")
        ssl_context = verify_cluster(config.cluster, config.user, config.abs_file, trust_env=False)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=max_connections),
            timeout=aiohttp.ClientTimeout(total=timeout),
            raise_for_status=False,
            trace_configs=trace_configs,
        )
        return cls(session, config.cluster.server, Credentials(config.user))

    async def aclose(self) -> None:
        await self.session.close()

    async def _headers(self, content_type: str | None, refresh: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        auth = await self.credentials.header(self.server, refresh=refresh)
        if auth:
            headers["Authorization"] = auth
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        for attempt in (1, 2):
            headers = await self._headers(content_type if data is not None else None, refresh=attempt == 2)
            async with self.session.request(
                method, self.server + path, data=data, params=_query(params), headers=headers
            ) as response:
                payload = await response.read()
                if response.status == 401 and attempt == 1:
                    continue  # a rotated token: read it again once
                if response.status >= 400:
                    raise _error(response.status, response.reason or "", payload)
                return json.loads(payload) if payload else {}
        raise AssertionError("unreachable")

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> JSON:
        return await self.request("GET", res.path(namespace, name))

    async def text(self, path: str, params: Mapping[str, str | int] | None = None) -> str:
        """GET of a plain-text subresource (a pod's `log`)."""
        for attempt in (1, 2):
            headers = await self._headers(None, refresh=attempt == 2)
            headers["Accept"] = "text/plain, */*"
            async with self.session.get(self.server + path, params=_query(params), headers=headers) as response:
                payload = await response.read()
                if response.status == 401 and attempt == 1:
                    continue
                if response.status >= 400:
                    raise _error(response.status, response.reason or "", payload)
                return payload.decode(errors="replace")
        raise AssertionError("unreachable")

    async def list(self, res: Resource, namespace: str | None = None, **params: str | int) -> JSON:
        return await self.request("GET", res.path(namespace), params=params)

    async def create(self, res: Resource, obj: JSON, namespace: str | None = None) -> JSON:
        return await self.request("POST", res.path(namespace), body=obj)

    async def replace(self, res: Resource, obj: JSON, namespace: str | None = None) -> JSON:
        return await self.request("PUT", res.path(namespace, obj["metadata"]["name"]), body=obj)

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: JSON,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> JSON:
        """A JSON merge patch. Put `metadata.resourceVersion` in it to make it conditional (409 if stale)."""
        return await self.request("PATCH", res.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH)

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        precondition_uid: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> None:
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if precondition_uid:
            body["preconditions"] = {"uid": precondition_uid}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        await self.request("DELETE", res.path(namespace, name), body=body)

    async def watch(self, res: Resource, namespace: str | None = None, **params: str | int) -> AsyncIterator[JSON]:
        """Yields watch events (`{"type": ..., "object": ...}`) until the server ends the stream."""
        query = _query({"watch": "1", **params})
        headers = await self._headers(None)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(
            self.server + res.path(namespace), params=query, headers=headers, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise _error(response.status, response.reason or "", await response.read())
            buffer = b""
            async for chunk in response.content.iter_any():  # objects can be larger than any line limit
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)


def _query(params: Mapping[str, str | int] | None) -> dict[str, str] | None:
    return {k: str(v) for k, v in params.items()} if params else None
