"""BatchSandbox tasks: one per replica from `spec.taskTemplate`, run by the task-executor sidecar.

For every Ready pod whose task is not finished, a follower coroutine talks to the executor at
`<podIP>:5758`: it submits the task (idempotent by id `<BatchSandbox uid>-<index>`), then long-polls
`GET /tasks/<id>?since=<revision>&wait=30`, which answers the moment the task changes. Each change
is recorded here and wakes the BatchSandbox's reconcile, which writes the counts and each sandbox's
task into status. No fixed poll: an idle running task costs one open connection.

Restarts lose nothing: a finished task is in status (and is never dispatched again); a running one
is submitted again by id, and the executor, which keeps its tasks on disk, answers with its state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import PoolSpec, TaskTemplate
from opensandbox_platform.controller.allocation import TERMINAL_TASK_STATES, written_tasks
from opensandbox_platform.controller.pods import PodInfo, TaskExecutorSidecar
from opensandbox_platform.kube.client import JSON
from opensandbox_platform.kube.workqueue import WorkQueue

log = logging.getLogger(__name__)

TERMINAL = TERMINAL_TASK_STATES
LONG_POLL = 30  # seconds the executor holds a GET open
SUBMIT_TIMEOUT = aiohttp.ClientTimeout(total=10)
POLL_TIMEOUT = aiohttp.ClientTimeout(total=LONG_POLL + 10)
RETRY_MIN, RETRY_MAX = 0.05, 1.0  # backoff while the executor does not answer (starting, restarting)
STATUS_FIELDS = ("state", "exitCode", "reason", "message", "startedAt", "finishedAt")


def task_id(bs: JSON, index: int) -> str:
    return f"{bs['metadata']['uid']}-{index}"


def submit_body(template: TaskTemplate, tid: str) -> JSON:
    body: JSON = {"id": tid, "command": template.command, "args": template.args or []}
    body["env"] = [{"name": e.name, "value": e.value or ""} for e in template.env or []]
    if template.workingDir:
        body["workingDir"] = template.workingDir
    if template.timeoutSeconds:
        body["timeoutSeconds"] = template.timeoutSeconds
    return body


def task_status(task: JSON) -> JSON:
    """A sandbox's `status.sandboxes[].task` from the executor's answer (absent fields left out)."""
    return {k: task[k] for k in STATUS_FIELDS if task.get(k) is not None}


def pool_sidecar(
    spec: PoolSpec, default_image: str | None, default_resources: JSON, pull_policy: str = "IfNotPresent"
) -> TaskExecutorSidecar | None:
    """The sidecar for a Pool's pods; ValueError when it is enabled but no image is known."""
    executor = spec.taskExecutor
    if executor is None or not executor.enabled:
        return None
    image = executor.image or default_image
    if not image:
        raise ValueError("taskExecutor.enabled needs taskExecutor.image or the controller's --task-executor-image")
    resources = executor.resources.model_dump(mode="json") if executor.resources else default_resources
    return TaskExecutorSidecar(image, resources, pull_policy)


@dataclass
class Follower:
    pod_uid: str
    task: asyncio.Task[None]


@dataclass
class BatchTasks:
    """What the controller knows of one BatchSandbox's tasks, beyond its status."""

    followers: dict[int, Follower] = field(default_factory=dict)
    reported: dict[int, JSON] = field(default_factory=dict)  # index -> task status from the executor


class TaskDispatcher:
    """Dispatches and follows tasks; one per controller (leader)."""

    def __init__(self, queue: WorkQueue, pod_token: Callable[[str], str | None] = lambda _: None) -> None:
        self.queue = queue
        self.pod_token = pod_token  # a pod's access token by its name (api/tokens.py)
        self.batches: dict[str, BatchTasks] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Its own connection pool: long polls hold one connection per running task and must not
        # starve the API client's pool.
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        for key in list(self.batches):
            self.forget(key)
        if self._session is not None:
            await self._session.close()

    def forget(self, key: str) -> None:
        batch = self.batches.pop(key, None)
        for follower in (batch.followers if batch else {}).values():
            follower.task.cancel()

    def sync(
        self, key: str, bs: JSON, template: TaskTemplate, pods: dict[int, PodInfo], ready: set[int]
    ) -> dict[int, JSON]:
        """Starts followers for Ready pods whose task is not finished; stops those of replaced pods.
        Returns each index's task status: reported by an executor, else as last written in status."""
        written = written_tasks(bs)
        batch = self.batches.setdefault(key, BatchTasks())
        tasks: dict[int, JSON] = dict(written)  # also of sandboxes whose pod is gone
        for index, pod in pods.items():
            follower = batch.followers.get(index)
            if follower is not None and follower.pod_uid != pod.uid:
                follower.task.cancel()  # the pod was replaced: its task runs again in the new one
                del batch.followers[index]
                batch.reported.pop(index, None)
                follower = None
            known = batch.reported.get(index) or written.get(index)
            if known is not None:
                tasks[index] = known
            if known is not None and known.get("state") in TERMINAL:
                continue
            if follower is None and index in ready and pod.ip:
                body = submit_body(template, task_id(bs, index))
                follow = asyncio.get_running_loop().create_task(self._follow(key, index, pod, body))
                batch.followers[index] = Follower(pod.uid, follow)
        for index in [i for i in batch.followers if i not in pods]:
            batch.followers.pop(index).task.cancel()
            batch.reported.pop(index, None)
        return tasks

    async def _follow(self, key: str, index: int, pod: PodInfo, body: JSON) -> None:
        base = f"http://{pod.ip}:{labels.TASK_EXECUTOR_PORT}/tasks"
        poll = f"{base}/{body['id']}?output=false&wait={LONG_POLL}&since="
        token = self.pod_token(pod.name)
        headers = {labels.TASK_EXECUTOR_TOKEN_HEADER: token} if token else None
        delay = RETRY_MIN
        since: int | None = None
        while True:
            try:
                if since is None:  # (again) after an error: the executor may have restarted
                    submit = f"{base}?output=false"
                    async with self.session.post(submit, json=body, headers=headers, timeout=SUBMIT_TIMEOUT) as r:
                        r.raise_for_status()
                        task = await r.json()
                else:
                    async with self.session.get(f"{poll}{since}", headers=headers, timeout=POLL_TIMEOUT) as r:
                        r.raise_for_status()
                        task = await r.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                log.debug("task executor unreachable", extra={"pod": pod.key, "error": str(err)})
                since = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            since = int(task.get("revision", 0))
            self._report(key, index, pod, task)
            if task.get("state") in TERMINAL:
                return

    def _report(self, key: str, index: int, pod: PodInfo, task: JSON) -> None:
        batch = self.batches.get(key)
        follower = batch.followers.get(index) if batch else None
        if batch is None or follower is None or follower.pod_uid != pod.uid:
            return  # forgotten or replaced meanwhile
        status = task_status(task)
        if batch.reported.get(index) != status:
            batch.reported[index] = status
            self.queue.add(key)
