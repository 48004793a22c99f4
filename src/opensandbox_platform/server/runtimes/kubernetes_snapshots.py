"""Snapshots of kubernetes sandboxes: a committer pod on the sandbox pod's node takes the container's
writable layer (runtimes/kubernetes_committer.py) and pushes it as an image, one layer over the
sandbox's own, to `kubernetes.snapshotRepository`; a create from the snapshot runs that image.

- The record of a snapshot is a ConfigMap named by its id (label `SNAPSHOT_ID`), so every server
  replica and a restarted server see it: Creating while its committer runs, then Ready (with the
  image `REPOSITORY@DIGEST`) or Failed with the committer's reason.
- The committer pod (`<id>-commit`) is placed with `nodeName` (the scheduler is not asked: it must
  be that node), runs privileged with the host's PID namespace (it freezes the container's cgroup
  and reads its overlay's upper dir through the shim's /proc/PID/root), tolerates every taint, and
  has a scratch volume bounded by the snapshot's own bound. The server waits for it on a watch, reads
  its termination message and deletes it. A committer that died without one (SIGKILL: its memory
  limit, node pressure) may have left the container frozen: the same pod on a thaw-only job
  (`<id>-thaw`) thaws it, and the Failed snapshot's message says so.
- A snapshot is in use while a BatchSandbox restored from it (`RESTORED_FROM`) exists: deleting it
  is refused (409), never deferred. Deleting a Ready one deletes its manifest from the registry.
- A pause's snapshot (`Record.pause`) is the server's own: deleted when its sandbox is gone or
  paused again (`forget_pauses`; the runtime's pause and resume are in kubernetes.py).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opensandbox_platform.api import labels
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import CONFIGMAPS, JSON, PODS, SECRETS, KubeClient, KubeError
from opensandbox_platform.server import errors
from opensandbox_platform.server.runtimes import kubernetes_committer as committer
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import Held, SnapshotRecord, SnapshotState
from opensandbox_platform.server.runtimes.oci_registry import Reference, Registry, RegistryError, docker_config_auths

log = logging.getLogger("opensandbox.kubernetes.snapshots")
RECORD_KEY = "record"
SCRATCH = "/scratch"
AUTH_DIR = "/var/run/opensandbox/registry"
SCRATCH_SLACK = 64 << 20  # the scratch volume: spooled contents and the layer, plus this
THAW_TIMEOUT = 60.0  # seconds for the thaw-only pod after a committer died (scheduled on a known node)


@dataclass
class Record(SnapshotRecord):
    reason: str = snaps.ACCEPTED
    image: str = ""  # Ready: REPOSITORY@DIGEST
    pause: bool = False  # taken by a pause: the server's own, deleted with its sandbox

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_configmap(cls, raw: JSON) -> Record | None:
        try:
            data = json.loads((raw.get("data") or {})[RECORD_KEY])
            data["held"] = Held(**data["held"])
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class CommitSettings:
    """`[kubernetes]` snapshot keys (server/config.py)."""

    repository: str
    committer_image: str
    max_bytes: int
    timeout_seconds: float
    ca_pem: str = ""
    registry_secret: str = ""
    ca_file: str = ""


# --- pure: the objects ---------------------------------------------------------------------------
def record_configmap(record: Record) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": record.id,
            "labels": {
                labels.CREATED_BY: labels.CREATED_BY_SERVER,
                labels.SNAPSHOT_ID: record.id,
                labels.SNAPSHOT_OF: record.sandbox_id,
            },
        },
        "data": {RECORD_KEY: record.to_json()},
    }


def committer_name(snapshot_id: str) -> str:
    return f"{snapshot_id}-commit"


def committer_pod(job: committer.Job, node: str, settings: CommitSettings, owner: JSON | None = None) -> JSON:
    """The committer's pod: on `node`, privileged, host PID namespace, every taint tolerated, a
    scratch volume the size of the bound (spool and layer), the registry Secret if any."""
    scratch_limit = 2 * settings.max_bytes + SCRATCH_SLACK
    container: JSON = {
        "name": "committer",
        "image": settings.committer_image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["commit-snapshot"],
        "env": [{"name": committer.JOB_ENV, "value": json.dumps(asdict(job), separators=(",", ":"))}],
        "securityContext": {"privileged": True, "runAsUser": 0, "runAsGroup": 0},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}],
        "terminationMessagePolicy": "File",
    }
    volumes: list[JSON] = [{"name": "scratch", "emptyDir": {"sizeLimit": str(scratch_limit)}}]
    if settings.registry_secret:
        container["volumeMounts"].append({"name": "registry", "mountPath": AUTH_DIR, "readOnly": True})
        volumes.append({"name": "registry", "secret": {"secretName": settings.registry_secret}})
    metadata: JSON = {
        "name": committer_name(job.snapshot_id),
        "labels": {labels.CREATED_BY: labels.CREATED_BY_SERVER, labels.SNAPSHOT_COMMITTER: job.snapshot_id},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "hostPID": True,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "activeDeadlineSeconds": max(1, int(settings.timeout_seconds)),
            "terminationGracePeriodSeconds": 5,  # it thaws the container on SIGTERM (its finally)
            "tolerations": [{"operator": "Exists"}],
            "containers": [container],
            "volumes": volumes,
        },
    }


def commit_job(snapshot_id: str, pod: JSON, settings: CommitSettings) -> tuple[committer.Job, str]:
    """The committer's job for the sandbox's pod (as the API server has it) and the node it must run
    on; 409 when the sandbox container is not running there."""
    status = pod.get("status") or {}
    found = [c for c in status.get("containerStatuses") or [] if c.get("name") == labels.SANDBOX_CONTAINER]
    node = (pod.get("spec") or {}).get("nodeName") or ""
    if not found or "running" not in (found[0].get("state") or {}) or not node:
        raise errors.ApiError(
            409, errors.SNAPSHOT_INVALID_SOURCE_STATE, "the sandbox's container is not running on a node"
        )
    container_id = str(found[0].get("containerID") or "").split("://", 1)[-1]
    job = committer.Job(
        snapshot_id=snapshot_id,
        container_id=container_id,
        base_image=str(found[0].get("imageID") or found[0].get("image") or ""),
        repository=settings.repository,
        max_bytes=settings.max_bytes,
        max_entries=snaps.MAX_ENTRIES,
        scratch=SCRATCH,
        ca_pem=settings.ca_pem,
        auth_file=f"{AUTH_DIR}/.dockerconfigjson" if settings.registry_secret else "",
    )
    return job, node


def thaw_name(snapshot_id: str) -> str:
    return f"{snapshot_id}-thaw"


def thaw_pod(committer_pod: JSON) -> JSON:
    """The rescue for a committer that died without its outcome (it may have left the sandbox frozen):
    the committer's pod (its node, image and privileges; as created, or as read back) on a thaw-only job."""
    meta, spec = committer_pod["metadata"], json.loads(json.dumps(committer_pod["spec"]))
    env = spec["containers"][0]["env"][0]
    job = {**json.loads(env["value"]), "thaw_only": True}
    env["value"] = json.dumps(job, separators=(",", ":"))
    kept = {k: meta[k] for k in ("labels", "ownerReferences") if k in meta}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**kept, "name": thaw_name(job["snapshot_id"])},
        "spec": spec,
    }


def _died(why: str) -> dict[str, Any]:
    """An outcome the committer did not write: it died (or never finished), perhaps inside its freeze."""
    return {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": why, "died": True}


def outcome_of(pod: JSON) -> dict[str, Any] | None:
    """The committer's outcome once its pod ended (its termination message), None while it runs."""
    status = pod.get("status") or {}
    phase = status.get("phase")
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            try:
                outcome = json.loads(terminated.get("message") or "")
                if isinstance(outcome, dict) and "ok" in outcome:
                    return outcome
            except ValueError:
                pass
            why = terminated.get("reason") or f"exit code {terminated.get('exitCode')}"
            return _died(f"the committer pod ended: {why}")
    if phase in ("Failed", "Succeeded"):
        return _died(f"the committer pod ended: {status.get('message') or status.get('reason') or phase}")
    return None


def apply_outcome(record: Record, outcome: dict[str, Any]) -> None:
    if outcome.get("ok"):
        record.image = str(outcome["image"])
        skipped = int(outcome.get("skipped") or 0)
        note = (
            f"; left out {skipped} device nodes, sockets or names the layer format reserves (.wh.*)" if skipped else ""
        )
        record.transition(
            SnapshotState.READY, snaps.READY, f"{outcome.get('files', 0)} files, {outcome.get('bytes', 0)} bytes{note}"
        )
    else:
        record.transition(
            SnapshotState.FAILED, str(outcome.get("reason") or snaps.CAPTURE_FAILED), str(outcome.get("message"))
        )


# --- the store and the work --------------------------------------------------------------------
Call = Callable[[Awaitable[Any]], Awaitable[Any]]


class KubernetesSnapshots:
    def __init__(self, client: Callable[[], KubeClient], call: Call, namespace: str, settings: CommitSettings) -> None:
        self._client = client
        self._call = call
        self.namespace = namespace
        self.settings = settings
        self._tasks: set[asyncio.Future[None]] = set()
        self._running: dict[str, asyncio.Future[None]] = {}  # snapshot id -> its committer's wait

    @property
    def client(self) -> KubeClient:
        return self._client()

    async def start(self) -> None:
        """Snapshots left Creating by a server that stopped: wait for their committers again."""
        for record in await self._records():
            if record.state == SnapshotState.CREATING:
                self._spawn(self._finish(record, None))

    async def forget_pauses(self, sandbox_id: str, keep: str = "") -> None:
        """Delete the pause snapshots of a sandbox (image and record) but `keep`: it is gone, or resumed
        from a newer one. Never raises (its caller is a watch handler or a sweep, and the sweep at the
        next start takes what is left)."""
        try:
            records = await self._records()
        except Exception as exc:
            log.warning("pause snapshots of %s not deleted yet: %s", sandbox_id, exc)
            return
        for record in records:
            if record.pause and record.sandbox_id == sandbox_id and record.id != keep:
                try:
                    await self.delete(record.id, [])
                except Exception as exc:
                    log.warning("pause snapshot %s of %s not deleted yet: %s", record.id, sandbox_id, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def begin(
        self, sandbox_id: str, name: str | None, held: Held, pod: JSON, owner: JSON | None = None, pause: bool = False
    ) -> Record:
        """Record the snapshot (Creating) and start its committer in the background."""
        now = times.rfc3339(digits=6)
        record = Record(snaps.new_id(), sandbox_id, name, held, created_at=now, last_transition_at=now, pause=pause)
        job, node = commit_job(record.id, pod, self.settings)
        await self._call(self.client.create(CONFIGMAPS, record_configmap(record), self.namespace))
        task = self._running[record.id] = self._spawn(
            self._finish(record, committer_pod(job, node, self.settings, owner))
        )
        task.add_done_callback(lambda _: self._running.pop(record.id, None))
        return record

    async def settled(self, snapshot_id: str) -> Record:
        """The snapshot once it is Ready or Failed (its committer may be another server's)."""
        while True:
            task = self._running.get(snapshot_id)
            if task is not None:
                await asyncio.shield(task)
            record = await self.find(snapshot_id)
            if record.state != SnapshotState.CREATING:
                return record
            await asyncio.sleep(1.0)

    async def _finish(self, record: Record, pod: JSON | None) -> None:
        """Run (or, after a restart, find) the committer, wait for its outcome, record it; never raises."""
        name = committer_name(record.id)
        try:
            if pod is not None:
                await self.client.create(PODS, pod, self.namespace)
            outcome = await asyncio.wait_for(self._outcome(name), self.settings.timeout_seconds + 30)
        except TimeoutError:
            outcome = _died("the committer did not finish in time")
        except KubeError as exc:
            missing = exc.not_found and pod is None
            why = "the server stopped during the capture" if missing else f"the committer pod failed: {exc.message}"
            outcome = {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": why}
        except Exception as exc:  # never left Creating
            log.exception("snapshot %s: the committer could not be run", record.id)
            outcome = {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": f"the committer failed: {exc!r}"}
        apply_outcome(record, outcome)
        if outcome.get("died"):
            record.message += await self._thaw(record.id, pod)
        log.info("snapshot %s of %s: %s (%s)", record.id, record.sandbox_id, record.state, record.message)
        await self._save(record)
        try:
            await self.client.delete(PODS, name, self.namespace)
        except Exception as exc:
            log.info("could not delete committer %s: %s", name, exc)

    async def _thaw(self, snapshot_id: str, created: JSON | None) -> str:
        """Run the thaw-only job on the committer's node after a committer died; what to add to the
        snapshot's message. Never raises."""
        name = thaw_name(snapshot_id)
        try:
            committer_pod = created or await self.client.get(PODS, committer_name(snapshot_id), self.namespace)
            await self.client.create(PODS, thaw_pod(committer_pod), self.namespace)
            outcome = await asyncio.wait_for(self._outcome(name), THAW_TIMEOUT)
        except Exception as exc:
            outcome = {"ok": False, "message": str(exc)}
        finally:
            with contextlib.suppress(Exception):
                await self.client.delete(PODS, name, self.namespace)
        if not outcome.get("ok"):
            log.warning(
                "snapshot %s: the sandbox may stay frozen, its thaw failed: %s", snapshot_id, outcome["message"]
            )
            return f"; the sandbox may stay frozen: its thaw failed ({outcome['message']})"
        return "; the sandbox was thawed" if outcome.get("thawed") else ""

    async def _outcome(self, name: str) -> dict[str, Any]:
        while True:
            pod = await self.client.get(PODS, name, self.namespace)
            outcome = outcome_of(pod)
            if outcome is not None:
                return outcome
            version = pod["metadata"]["resourceVersion"]
            async for event in self.client.watch(
                PODS, self.namespace, fieldSelector=f"metadata.name={name}", resourceVersion=version, timeoutSeconds=60
            ):
                if event.get("type") == "ERROR":
                    break
                outcome = outcome_of(event.get("object") or {})
                if outcome is not None:
                    return outcome
                if event.get("type") == "DELETED":  # its sandbox was deleted (the pod is the sandbox's)
                    return {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": "the committer pod was deleted"}

    async def _save(self, record: Record) -> None:
        for _ in range(5):
            try:
                await self.client.replace(CONFIGMAPS, record_configmap(record), self.namespace)
                return
            except Exception as exc:
                log.warning("snapshot %s: could not save its record yet: %s", record.id, exc)
                await asyncio.sleep(1)

    async def _records(self) -> builtins.list[Record]:
        selector = f"{labels.CREATED_BY}={labels.CREATED_BY_SERVER},{labels.SNAPSHOT_ID}"
        listed = await self._call(self.client.list(CONFIGMAPS, self.namespace, labelSelector=selector))
        return [r for r in map(Record.from_configmap, listed.get("items") or []) if r is not None]

    async def find(self, snapshot_id: str) -> Record:
        if not snapshot_id.startswith("snap-") or len(snapshot_id) > 63:
            raise errors.snapshot_not_found(snapshot_id)
        try:
            raw = await self._call(self.client.get(CONFIGMAPS, snapshot_id, self.namespace))
        except KubeError as exc:
            if exc.not_found:
                raise errors.snapshot_not_found(snapshot_id) from None
            raise
        record = Record.from_configmap(raw)
        if record is None or (raw["metadata"].get("labels") or {}).get(labels.SNAPSHOT_ID) != snapshot_id:
            raise errors.snapshot_not_found(snapshot_id)
        return record

    async def list(self) -> builtins.list[Record]:
        return await self._records()

    async def delete(self, snapshot_id: str, users: builtins.list[str]) -> None:
        """Refused (409) while Creating or while a sandbox uses it; a Ready one's manifest goes too."""
        record = await self.find(snapshot_id)
        if record.state == SnapshotState.CREATING:
            raise snaps.still_creating(snapshot_id)
        if users:
            raise snaps.in_use(snapshot_id, users)
        if record.image:
            await self.delete_image(record.image)
        try:
            await self._call(self.client.delete(CONFIGMAPS, snapshot_id, self.namespace))
        except KubeError as exc:
            if not exc.not_found:
                raise

    async def delete_image(self, image: str) -> None:
        """The manifest's reference in the registry (its blobs go at the registry's garbage collection)."""
        ref = Reference.parse(image)
        auths = await self._auths()
        try:
            await asyncio.to_thread(_delete_manifest, ref, self.settings.ca_file, auths.get(ref.registry))
        except (RegistryError, OSError) as exc:
            log.warning("snapshot image %s could not be deleted: %s", image, exc)
            status = getattr(exc, "status", 0)
            if status not in (404, 405):  # gone already, or a registry that never deletes
                raise errors.ApiError(
                    502, errors.INTERNAL_ERROR, f"the registry did not delete the snapshot's image: {exc}"
                ) from None

    async def _auths(self) -> dict[str, tuple[str, str]]:
        if not self.settings.registry_secret:
            return {}
        secret = await self._call(self.client.get(SECRETS, self.settings.registry_secret, self.namespace))
        raw = base64.b64decode((secret.get("data") or {}).get(".dockerconfigjson", ""))
        return docker_config_auths(raw)


def _delete_manifest(ref: Reference, ca_file: str, credentials: tuple[str, str] | None) -> None:
    with Registry(ref.registry, ca_file=ca_file, credentials=credentials) as registry:
        registry.delete_manifest(ref.repository, ref.digest)


def read_ca(path: str) -> str:
    return Path(path).read_text() if path else ""


def held_of(batchsandbox: JSON, image: str, entrypoint: builtins.list[str]) -> Held:
    """What a restore takes from the sandbox besides its files: its image, entrypoint, the env and
    limits its BatchSandbox's template gives the sandbox container (direct mode; a pooled one's
    template holds only the create's env), without the lifecycle's start gate."""
    template = ((batchsandbox.get("spec") or {}).get("sandboxTemplate") or {}).get("spec") or {}
    containers = [c for c in template.get("containers") or [] if c.get("name") == labels.SANDBOX_CONTAINER]
    container = containers[0] if containers else template
    env = {
        str(e["name"]): str(e.get("value", ""))
        for e in container.get("env") or []
        if "name" in e and e["name"] != labels.START_GATE_ENV  # the create's preStart gate, not the sandbox's
    }
    limits = (container.get("resources") or {}).get("limits") or {}
    return Held(
        image=image,
        entrypoint=list(entrypoint),
        env=env,
        cpu_millis=_cpu_millis(limits.get("cpu")),
        memory_bytes=_bytes(limits.get("memory")),
    )


_SUFFIXES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}


def _cpu_millis(value: Any) -> int | None:
    text = str(value or "")
    if not text:
        return None
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def _bytes(value: Any) -> int | None:
    text = str(value or "")
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text) if text.isdigit() else None
