"""The images the tests and benchmarks use: their names, and those of this tree (tools/build-image.sh),
built when missing or built from other sources.

An image carries the hash of the sources it was built from (label opensandbox.io/source-hash), so a
fresh clone of the same commit reuses the images of an earlier run instead of rebuilding them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from harness.locks import machine_lock
from harness.paths import ROOT, TOOLS

if TYPE_CHECKING:
    from harness.real_node import RealNode

# The base image of sandboxes in the tests (tools/test-image.sh, built by tools/podman.sh up).
TEST_IMAGE = "localhost/opensandbox-test-base:latest"
# The images of this tree the tests build and use, as podman and the real node's containerd name them.
EXECD_IMAGE = "localhost/opensandbox/execd:dev"
TASK_EXECUTOR_IMAGE = "localhost/opensandbox/task-executor:dev"
EGRESS_IMAGE = "localhost/opensandbox/egress:dev"  # the network-policy sidecar (docker and kubernetes)
# Python + ipykernel + numpy/pandas/matplotlib, bash and JavaScript kernels (tools/code-interpreter-image.sh).
CODE_INTERPRETER_IMAGE = "localhost/opensandbox/code-interpreter:dev"

SOURCES = [ROOT / "src", ROOT / "images", TOOLS / "build-image.sh", TOOLS / "pyinstaller.sh", ROOT / "uv.lock"]
HASH_LABEL = "opensandbox.io/source-hash"


def qualified(image: str) -> str:
    """The name podman stores: an unqualified name is docker.io/NAME (build-image.sh tags it so)."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}"


@cache
def source_hash() -> str:
    """The hash of every input of the images: paths and contents (not __pycache__)."""
    digest = hashlib.sha256()
    files: list[Path] = [p for root in SOURCES for p in ([root] if root.is_file() else root.rglob("*"))]
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def built_from(image: str) -> str | None:
    """The source hash `image` was built from, or None when it is missing."""
    result = subprocess.run(
        ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{HASH_LABEL}"}}}}', qualified(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def built_image(program: str, image: str) -> str:
    """`image` of `program` (controller, server, execd, task-executor), rebuilt unless it was built from
    these sources; returns its qualified name (as podman and, once loaded, the node's containerd know it)."""
    with machine_lock(f"image-{program}"):  # both parts of `make test` may want it at once
        return _built_image(program, image)


def _built_image(program: str, image: str) -> str:
    if built_from(image) != source_hash():
        build = subprocess.run(
            [str(TOOLS / "build-image.sh"), program, image],
            cwd=ROOT,
            env={**os.environ, "SOURCE_HASH": source_hash()},
            capture_output=True,
            text=True,
            check=False,
        )
        assert build.returncode == 0, f"tools/build-image.sh {program} {image}:\n{build.stderr[-4000:]}"
    return qualified(image)


def load_task_executor_image(node: RealNode) -> str:
    """Loads the task-executor image (rebuilt when its sources changed) into the real node's containerd
    and returns its name as containerd knows it."""
    image = built_image("task-executor", TASK_EXECUTOR_IMAGE)
    node.load_image(image)
    return image


@cache
def code_interpreter_image() -> str:
    """The code-interpreter image, built (minutes, once per machine; then cached) unless present.
    tools/code-interpreter-image.sh is idempotent: it rebuilds only when the script changed."""
    with machine_lock("image-code-interpreter"):
        build = subprocess.run(
            [str(TOOLS / "code-interpreter-image.sh"), CODE_INTERPRETER_IMAGE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    assert build.returncode == 0, f"tools/code-interpreter-image.sh:\n{build.stderr[-4000:]}"
    return CODE_INTERPRETER_IMAGE
