"""Rendering the chart with the helm binary of the tool cache (`make tools`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from harness.paths import ROOT, cache_dir

CHART = ROOT / "charts" / "opensandbox-controller"
RELEASE = "opensandbox-controller"

Doc = dict[str, Any]


def helm_binary() -> Path:
    path = cache_dir() / "bin" / "helm"
    assert path.exists(), f"{path} is missing: `make tools` builds it"
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm_binary()), *args], text=True, capture_output=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def set_args(values: dict[str, str]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += ["--set-string" if value.startswith("str:") else "--set", f"{key}={value.removeprefix('str:')}"]
    return args


def render(values: dict[str, str] | None = None, *extra: str) -> list[Doc]:
    out = helm("template", RELEASE, str(CHART), *set_args(values or {}), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_error(values: dict[str, str], *extra: str) -> str:
    result = helm("template", RELEASE, str(CHART), *set_args(values), *extra, check=False)
    assert result.returncode != 0, "rendered although it should not"
    return result.stderr


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc | None:
    for doc in docs:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    return None


def get(docs: list[Doc], kind: str, name: str) -> Doc:
    doc = find(docs, kind, name)
    assert doc is not None, f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return doc
