"""Raw-JSON access to the Kubernetes API over lightkube's configured HTTP client.

lightkube loads kubeconfig / in-cluster config and builds an authenticated HTTP client; we speak
JSON dicts on top of it, so hot paths (lists and watches of thousands of pods) never build full
model objects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
from lightkube.config.client_adapter import user_auth, verify_cluster
from lightkube.config.kubeconfig import KubeConfig

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

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

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
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False)
SUBJECT_ACCESS_REVIEWS = Resource(
    "authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", namespaced=False
)


class ApiError(Exception):
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


def _error(response: httpx2.Response) -> ApiError:
    try:
        body = response.json()
        return ApiError(response.status_code, body.get("reason", ""), body.get("message", response.text))
    except ValueError:
        return ApiError(response.status_code, response.reason_phrase, response.text)


class KubeClient:
    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http

    @classmethod
    def from_config(cls, kubeconfig: str | None = None, *, max_connections: int = 64) -> KubeClient:
        """From a kubeconfig file, else the in-cluster service account, else $KUBECONFIG/~/.kube/config."""
        config = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
        if config is None or config.user is None:
            raise ValueError("the kubeconfig has no current context with a user")
        http = httpx2.AsyncClient(
            base_url=config.cluster.server,
            verify=verify_cluster(config.cluster, config.user, config.abs_file, trust_env=False),
            auth=user_auth(config.user),
            timeout=httpx2.Timeout(30.0),
            # Bursts of claims and status writes run concurrently: keep that many connections alive.
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,
        )
        return cls(http)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        content = None if body is None else json.dumps(body, separators=(",", ":"))
        headers = {"Content-Type": content_type} if content is not None else None
        response = await self.http.request(method, path, content=content, params=params, headers=headers)
        if response.status_code >= 400:
            raise _error(response)
        return response.json() if response.content else {}

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> JSON:
        return await self.request("GET", res.path(namespace, name))

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
        self, res: Resource, name: str, namespace: str | None = None, *, precondition_uid: str | None = None
    ) -> None:
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if precondition_uid:
            body["preconditions"] = {"uid": precondition_uid}
        await self.request("DELETE", res.path(namespace, name), body=body)

    async def watch(self, res: Resource, namespace: str | None = None, **params: str | int) -> AsyncIterator[JSON]:
        """Yields watch events (`{"type": ..., "object": ...}`) until the server ends the stream."""
        query = {"watch": "1", **params}
        async with self.http.stream("GET", res.path(namespace), params=query, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response)
            async for line in response.aiter_lines():
                if line:
                    yield json.loads(line)
