"""The images of this tree (tools/build-image.sh), built for a test when missing or older than the sources."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.services import ROOT, TOOLS

SOURCES = [ROOT / "src", ROOT / "images", TOOLS / "build-image.sh", TOOLS / "pyinstaller.sh", ROOT / "uv.lock"]


def qualified(image: str) -> str:
    """The name podman stores: an unqualified name is docker.io/NAME (build-image.sh tags it so)."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}"


def newest_source() -> float:
    """The newest input of the images (not __pycache__, which every test run rewrites)."""
    files: list[Path] = [p for root in SOURCES for p in ([root] if root.is_file() else root.rglob("*"))]
    return max(p.stat().st_mtime for p in files if p.is_file() and "__pycache__" not in p.parts)


def image_created(image: str) -> float | None:
    result = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Created.Unix}}", qualified(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return float(result.stdout.strip()) if result.returncode == 0 else None


def built_image(program: str, image: str) -> str:
    """`image` of `program` (controller, server, execd, task-executor), rebuilt when missing or stale;
    returns its qualified name (as podman and, once loaded, the node's containerd know it)."""
    created = image_created(image)
    if created is None or created < newest_source():
        build = subprocess.run(
            [str(TOOLS / "build-image.sh"), program, image], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert build.returncode == 0, f"tools/build-image.sh {program} {image}:\n{build.stderr[-4000:]}"
    return qualified(image)
