"""`opensandbox-code-interpreter` 1.1.1 through the server's kubernetes runtime, pooled on the real
node (on unless OSB_REAL_NODE=0): the Pool's pods run the code-interpreter image with
`EXECD_CODE_PRESTART=python`, so execd starts a Python kernel while the pod waits in the pool and a
claimed sandbox runs its first cell without a kernel start.

The controller injects execd (`--execd-image`); the SDK talks to execd at the pod IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from code_interpreter import CodeInterpreter
from lightkube import Client
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit

from harness.controller_process import ControllerProcess
from harness.images import EXECD_IMAGE, built_image, code_interpreter_image
from harness.kube import eventually, idle_ready, pool_manifest, pool_pods
from harness.kubernetes_server import KubernetesServer
from harness.real_node import RealNode, real_node_pod_spec
from harness.services import LocalCluster

POOL = "code"
# A Python kernel (~60 MiB), the bridge (~35 MiB) and execd (~20 MiB) need more than the tests' usual 128Mi.
RESOURCES = {"limits": {"cpu": "1", "memory": "768Mi"}, "requests": {"cpu": "250m", "memory": "256Mi"}}


@pytest.fixture(scope="session")
def images(node: RealNode) -> tuple[str, str]:
    image = code_interpreter_image()
    node.load_image(built_image("execd", EXECD_IMAGE))
    node.load_image(image)
    return EXECD_IMAGE, image


@pytest.fixture
def execd_controller(
    cluster: LocalCluster, crds: None, namespace: str, images: tuple[str, str]
) -> Iterator[ControllerProcess]:
    proc = ControllerProcess(cluster, namespace, "--execd-image", images[0]).start()
    yield proc
    proc.stop()


@pytest.fixture
def pool(
    cluster: LocalCluster, kube: Client, namespace: str, execd_controller: ControllerProcess, images: tuple[str, str]
) -> str:
    """A Pool whose pods pre-start a Python kernel: this is all a Pool template needs to enable it."""
    spec = real_node_pod_spec(
        image=images[1],
        command=["sleep", "infinity"],
        env=[{"name": "EXECD_CODE_PRESTART", "value": "python"}],
        resources=RESOURCES,
    )
    manifest = pool_manifest(POOL, spec, minimum=1, maximum=1, capacity=3)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: idle_ready(pool_pods(kube, namespace, POOL)), timeout=180, what="a Ready code pod")
    return POOL


@contextlib.asynccontextmanager
async def interpreter_in(server: KubernetesServer, pool: str, env: dict[str, str]) -> AsyncIterator[CodeInterpreter]:
    config = ConnectionConfig(domain=server.domain, disable_metrics=True)
    sandbox = await Sandbox.create(
        "code-interpreter",
        connection_config=config,
        extensions={"poolRef": pool},
        env=env,
        resource=RESOURCES["limits"],
    )
    try:
        interpreter = await CodeInterpreter.create(sandbox)  # the strict health check: port 44771
        yield interpreter
        await interpreter.aclose()
    finally:
        with contextlib.suppress(SandboxApiException):
            await sandbox.kill()
        await sandbox.close()


async def test_pooled_code_interpreter_with_a_prestarted_kernel(server: KubernetesServer, pool: str) -> None:
    started = time.monotonic()
    async with interpreter_in(server, pool, {"CLAIMED": "pooled"}) as interpreter:
        codes = interpreter.codes
        first = await codes.run("import os\nx = 41\nos.environ['CLAIMED']")
        first_result_s = time.monotonic() - started
        assert [r.text for r in first.result] == ["'pooled'"]  # the claim's env reached the kernel
        assert first.execution_count == 1
        assert [r.text for r in (await codes.run("x + 1")).result] == ["42"]
        assert first_result_s < 5, f"create -> first result took {first_result_s:.2f}s"

        printed = await codes.run("for i in range(10000):\n    print(i)")
        assert "".join(m.text for m in printed.logs.stdout) == "".join(f"{i}\n" for i in range(10000))

        plot = await codes.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
        assert plot.error is None and any("Figure" in (r.text or "") for r in plot.result)

        failed = await codes.run("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError" and failed.error.traceback
        assert [r.text for r in (await codes.run("x")).result] == ["41"]

        one = await codes.create_context("python")
        two = await codes.create_context("python")
        await codes.run("secret = 1", context=one)
        other = await codes.run("secret", context=two)
        assert other.error is not None and other.error.name == "NameError"

        ready = asyncio.Event()

        async def on_init(init: ExecutionInit) -> None:
            ready.set()

        sleeping = asyncio.create_task(
            codes.run("import time\ntime.sleep(60)", context=one, handlers=ExecutionHandlers(on_init=on_init))
        )
        await asyncio.wait_for(ready.wait(), 30)
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        await codes.interrupt(one.id or "")
        interrupted = await asyncio.wait_for(sleeping, 10)
        assert time.monotonic() - asked < 1.0
        assert interrupted.error is not None and interrupted.error.name == "KeyboardInterrupt"
        assert [r.text for r in (await codes.run("secret", context=one)).result] == ["1"]

        bash = await codes.create_context("bash")
        await codes.run("cd /tmp && export K8S=yes", context=bash)
        shown = await codes.run('echo "$PWD $K8S"', context=bash)
        assert "".join(m.text for m in shown.logs.stdout).strip() == "/tmp yes"

        died = await codes.run("import os\nos._exit(1)", context=two)
        assert died.error is not None and died.error.name == "KernelDied"
        assert [r.text for r in (await codes.run("'fresh'", context=two)).result] == ["'fresh'"]

        with pytest.raises(SandboxApiException) as raised:
            await codes.create_context("cobol")
        assert raised.value.status_code == 400
