"""The CRDs generated from the models: structural, and identical to the copy we ship."""

from pathlib import Path
from typing import Any

import yaml

from opensandbox_platform.api.crdgen import all_crds, render

SHIPPED = Path(__file__).parents[3] / "config" / "crds.yaml"


def walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += walk(value)
    elif isinstance(node, list):
        for value in node:
            found += walk(value)
    return found


def test_shipped_crds_equal_the_generated_ones() -> None:
    assert SHIPPED.read_text() == render(), "config/crds.yaml is stale: run `make crds`"


def test_schemas_are_structural() -> None:
    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for node in walk(schema):
            assert "$ref" not in node and "anyOf" not in node and "title" not in node
            if "properties" in node:
                assert node.get("type") == "object"


def test_names_columns_and_status_subresource() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in all_crds()}
    assert crds["Pool"]["spec"]["names"]["shortNames"] == ["sbxpool"]
    assert crds["BatchSandbox"]["spec"]["names"]["shortNames"] == ["bsbx"]
    for crd in crds.values():
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert crd["metadata"]["name"] in ("pools.sandbox.opensandbox.io", "batchsandboxes.sandbox.opensandbox.io")
    printed = crds["BatchSandbox"]["spec"]["versions"][0]["additionalPrinterColumns"]
    default = ["DESIRED", "READY", "POOL", "PHASE", "EXPIRE", "AGE"]
    assert [c["name"] for c in printed if not c.get("priority")] == default
    assert [c["name"] for c in printed if c.get("priority")] == ["TASKS-SUCCEEDED", "TASKS-FAILED"]  # -o wide
    columns = [c["name"] for c in crds["Pool"]["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["MIN", "MAX", "CAPACITY", "TOTAL", "AVAILABLE", "ALLOCATED", "AGE"]


def test_seed_examples_validate_against_the_models() -> None:
    from opensandbox_platform.api.crds import BatchSandboxSpec, PoolSpec

    pool = yaml.safe_load(
        "minBufferSize: 2\nmaxBufferSize: 5\ncapacity: 10\n"
        "sandboxTemplate: {spec: {image: 'ubuntu:latest', command: [sleep, infinity]}}"
    )
    assert PoolSpec.model_validate(pool).sandboxTemplate.spec.image == "ubuntu:latest"
    bs = BatchSandboxSpec.model_validate(
        {"replicas": 3, "ttlSecondsAfterFinished": 3600, "sandboxTemplate": pool["sandboxTemplate"]}
    )
    assert bs.replicas == 3
