"""helm (built from source) installs and uninstalls a chart in the local cluster."""

import subprocess
from pathlib import Path

from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap

from harness.services import LocalCluster

CHART = Path(__file__).parents[1] / "fixtures" / "tiny-chart"


def helm(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run(
        [str(cluster.bin_dir / "helm"), *args], env=cluster.env(), text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_helm_install_and_uninstall(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    helm(cluster, "install", "tiny", str(CHART), "-n", namespace, "--set", "greeting=hi", "--wait")
    config_map = kube.get(ConfigMap, "tiny-greeting", namespace=namespace)
    assert config_map.data == {"greeting": "hi"}
    assert "tiny" in helm(cluster, "list", "-n", namespace, "-q").split()

    helm(cluster, "uninstall", "tiny", "-n", namespace, "--wait")
    try:
        kube.get(ConfigMap, "tiny-greeting", namespace=namespace)
        raise AssertionError("the ConfigMap survived helm uninstall")
    except ApiError as err:
        assert err.status.code == 404
    assert helm(cluster, "list", "-n", namespace, "-q").strip() == ""
