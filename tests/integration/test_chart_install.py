"""The chart installed into the local control plane: defaults, the README's examples, upgrade without
CRDs, uninstall keeping them, what the ServiceAccounts and roles may do, and the README's kubectl
troubleshooting commands. Deployments become Available on kwok nodes (nothing runs there); the
tests in test_chart_real_node.py run the images.

CRDs are shared with every other test: these tests never delete them, and a release only renders
CRDs that are absent or its own (templates/crds.yaml), so `kubectl apply --server-side` of
config/crds.yaml (tests/conftest.py) keeps working.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.paths import ROOT
from harness.services import LocalCluster

CHART = ROOT / "charts" / "opensandbox-controller"
CRDS = ("pools.sandbox.opensandbox.io", "batchsandboxes.sandbox.opensandbox.io")
TIMEOUT = 180


def helm(cluster: LocalCluster, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(cluster.bin_dir / "helm"), *args], env=cluster.env(), text=True, capture_output=True, cwd=cwd
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def shell(cluster: LocalCluster, command: str, cwd: Path = ROOT) -> str:
    """A README command line, run as written (bash, with the cluster's kubectl and helm on PATH)."""
    result = subprocess.run(["bash", "-c", command], env=cluster.env(), text=True, capture_output=True, cwd=cwd)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def can_i(cluster: LocalCluster, verb: str, resource: str, who: str, namespace: str | None = None) -> bool:
    resource, _, subresource = resource.partition("/") if not resource.startswith("/") else (resource, "", "")
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["-n", namespace] if namespace else []
    answer = cluster.kubectl(*args, check=False).strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def wait_available(cluster: LocalCluster, namespace: str, release: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={release}"
    names = cluster.kubectl("get", "deployment", "-n", namespace, "-l", selector, "-o", "name").split()
    assert names, f"no Deployments of {release} in {namespace}"
    cluster.kubectl(
        "wait", "deployment", "-n", namespace, "-l", selector, "--for=condition=Available", f"--timeout={TIMEOUT}s"
    )
    return names


def crds_served(cluster: LocalCluster) -> None:
    for crd in CRDS:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@pytest.fixture
def release(cluster: LocalCluster, namespace: str) -> Iterator[str]:
    """A release name for this test's namespace; uninstalled afterwards (the test may have done it)."""
    name = f"r{namespace.removeprefix('t-')}"
    yield name
    subprocess.run(
        [str(cluster.bin_dir / "helm"), "uninstall", name, "-n", namespace, "--wait"],
        env=cluster.env(),
        capture_output=True,
        check=False,
    )


def install(cluster: LocalCluster, release: str, namespace: str, *args: str) -> str:
    """helm install into the test's namespace (namespaceOverride set to it), then wait for Available."""
    ns_args = ["-n", namespace, "--set", f"namespaceOverride={namespace}"]
    out = helm(cluster, "install", release, str(CHART), *ns_args, *args)
    wait_available(cluster, namespace, release)
    return out


def test_install_defaults_upgrade_without_crds_and_uninstall(
    cluster: LocalCluster, namespace: str, release: str
) -> None:
    notes = install(cluster, release, namespace)
    assert f"kubectl port-forward -n {namespace} svc/{release}-server 8080:8080" in notes
    deployments = wait_available(cluster, namespace, release)
    assert sorted(deployments) == [
        f"deployment.apps/{release}-controller-manager",
        f"deployment.apps/{release}-server",
    ]
    crds_served(cluster)
    manifest = list(yaml.safe_load_all(helm(cluster, "get", "manifest", release, "-n", namespace)))
    assert all(d["metadata"].get("namespace", namespace) == namespace for d in manifest if d)

    # The README's example 4: an upgrade that leaves the CRDs alone.
    helm(cluster, "upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--set", "crds.install=false")
    wait_available(cluster, namespace, release)
    crds_served(cluster)
    assert "CustomResourceDefinition" not in helm(cluster, "get", "manifest", release, "-n", namespace)

    helm(cluster, "uninstall", release, "-n", namespace, "--wait")
    crds_served(cluster)  # kept
    assert cluster.kubectl("get", "deployment", "-n", namespace, "-o", "name").strip() == ""
    assert f"sandbox-k8s-{release}-" not in cluster.kubectl("get", "clusterrole", "-o", "name")
    # What tests/conftest.py does still works on CRDs a release installed.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "config" / "crds.yaml"))
    crds_served(cluster)


def test_crds_installed_by_a_release_are_upgraded_and_kept(cluster: LocalCluster, namespace: str, release: str) -> None:
    """Whoever installed the CRDs, a second release installs fine; the CRDs' owner keeps them on uninstall."""
    install(cluster, release, namespace)
    owner = cluster.kubectl(
        "get", "crd", CRDS[0], "-o", "jsonpath={.metadata.annotations.meta\\.helm\\.sh/release-name}"
    )
    rendered = "CustomResourceDefinition" in helm(cluster, "get", "manifest", release, "-n", namespace)
    assert rendered == (owner == release)  # only an absent or own CRD is rendered
    policy = cluster.kubectl("get", "crd", CRDS[0], "-o", "jsonpath={.metadata.annotations.helm\\.sh/resource-policy}")
    if owner:
        assert policy == "keep"


SEED_EXAMPLES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "custom-image": (
        ["--set", "controllerManager.image.repository=myregistry.com/sandbox-controller",
         "--set", "controllerManager.image.tag=latest"],
        {"controller_image": "myregistry.com/sandbox-controller:latest"},
    ),
    "high-availability": (
        ["--set", "controllerManager.replicas=3", "--set", "controllerManager.resources.requests.cpu=100m",
         "--set", "controllerManager.resources.requests.memory=256Mi"],
        {"controller_replicas": 3, "controller_memory_limit": "256Mi"},
    ),
    "prometheus": (["--set", "metrics.serviceMonitor.enabled=true"], {"service_monitor": True}),
    "nodeport": (
        ["--set", "server.service.type=NodePort", "--set", "server.service.nodePort=30080"],
        {"node_port": 30080},
    ),
    "ingress": (
        ["--set", "server.ingress.enabled=true", "--set", "server.ingress.className=nginx",
         "--set", "server.ingress.hosts[0].host=opensandbox.example.com",
         "--set", "server.ingress.hosts[0].paths[0].path=/",
         "--set", "server.ingress.hosts[0].paths[0].pathType=Prefix"],
        {"ingress_host": "opensandbox.example.com"},
    ),
    "without-server": (["--set", "server.enabled=false"], {"no_server": True}),
}  # fmt: skip


SERVICE_MONITOR_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
  annotations: {opensandbox.io/test: "a stand-in for the Prometheus Operator's CRD"}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""


@pytest.mark.parametrize("example", sorted(SEED_EXAMPLES))
def test_readme_install_examples(cluster: LocalCluster, namespace: str, release: str, example: str) -> None:
    args, expect = SEED_EXAMPLES[example]
    if expect.get("service_monitor"):
        # Without the Prometheus Operator in the test cluster: its CRD (kept; other tests ignore it).
        cluster.kubectl("apply", "--server-side", "-f", "-", input=SERVICE_MONITOR_CRD)
        cluster.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com")
    install(cluster, release, namespace, *args)
    controller = f"{release}-controller-manager"

    def get(kind: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = yaml.safe_load(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "yaml"))
        return obj

    if "controller_image" in expect:
        pod = get("deployment", controller)["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == expect["controller_image"]
    if "controller_replicas" in expect:
        status = get("deployment", controller)["status"]
        assert status["availableReplicas"] == expect["controller_replicas"]
        limits = get("deployment", controller)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["memory"] == expect["controller_memory_limit"]
    if expect.get("service_monitor"):
        monitor = get("servicemonitor", f"{controller}-metrics-monitor")
        endpoint = monitor["spec"]["endpoints"][0]
        assert (endpoint["port"], endpoint["scheme"], endpoint["interval"]) == ("https", "https", "30s")
        selected = cluster.kubectl(
            "get", "svc", "-n", namespace, "-o", "name",
            "-l", ",".join(f"{k}={v}" for k, v in monitor["spec"]["selector"]["matchLabels"].items()),
        ).split()  # fmt: skip
        assert selected == [f"service/{controller}-metrics-service"]
    if "node_port" in expect:
        assert get("svc", f"{release}-server")["spec"]["ports"][0]["nodePort"] == expect["node_port"]
    if "ingress_host" in expect:
        ingress = get("ingress", f"{release}-server")["spec"]
        assert ingress["ingressClassName"] == "nginx"
        assert ingress["rules"][0]["host"] == expect["ingress_host"]
    if expect.get("no_server"):
        assert f"{release}-server" not in cluster.kubectl("get", "all,configmap,sa,role", "-n", namespace, "-o", "name")


def test_service_accounts_and_roles_may_do_what_they_need_and_no_more(
    cluster: LocalCluster, namespace: str, release: str
) -> None:
    install(cluster, release, namespace)
    sa = f"system:serviceaccount:{namespace}"
    controller, server = f"{sa}:{release}-controller-manager", f"{sa}:{release}-server"
    elsewhere = "default"
    bs, pool = "batchsandboxes.sandbox.opensandbox.io", "pools.sandbox.opensandbox.io"
    may = [
        (controller, "create", "pods"), (controller, "patch", "pods"), (controller, "delete", "pods"),
        (controller, "watch", "pods"), (controller, "create", "events"),
        (controller, "list", pool), (controller, "watch", bs),
        (controller, "patch", f"{pool}/status"), (controller, "patch", f"{bs}/status"),
        (controller, "delete", bs), (controller, "update", "leases.coordination.k8s.io"),
        (server, "create", bs), (server, "patch", bs), (server, "delete", bs), (server, "watch", pool),
    ]  # fmt: skip
    may_not = [
        (controller, "get", "secrets"), (controller, "update", "pods"), (controller, "create", "pods/exec"),
        (controller, "create", pool), (controller, "patch", pool),
        (controller, "create", bs), (controller, "delete", "nodes"),
        (server, "create", pool), (server, "list", "pods"), (server, "get", "secrets"),
        (server, "update", f"{bs}/status"),
    ]  # fmt: skip
    for who, verb, resource in may:
        assert can_i(cluster, verb, resource, who, namespace), f"{who} may not {verb} {resource}"
    for who, verb, resource in may_not:
        assert not can_i(cluster, verb, resource, who, namespace), f"{who} may {verb} {resource}"
    # Only in its namespace; cluster-wide only the reviews that authenticate metrics scrapers.
    assert not can_i(cluster, "create", "pods", controller, elsewhere)
    assert not can_i(cluster, "list", bs, server, elsewhere)
    assert can_i(cluster, "create", "tokenreviews.authentication.k8s.io", controller)
    assert can_i(cluster, "create", "subjectaccessreviews.authorization.k8s.io", controller)
    assert not can_i(cluster, "get", "/metrics", controller)

    # The extra roles, bound in the namespace.
    prefix = f"sandbox-k8s-{release}"
    for user, role in [("alice", "batchsandbox-editor-role"), ("bob", "batchsandbox-viewer-role"),
                       ("carol", "pool-editor-role"), ("dave", "pool-viewer-role")]:  # fmt: skip
        role_ref = f"--clusterrole={prefix}-{role}"
        cluster.kubectl("create", "rolebinding", user, "-n", namespace, role_ref, f"--user={user}")
    assert can_i(cluster, "create", bs, "alice", namespace) and can_i(cluster, "delete", bs, "alice", namespace)
    assert not can_i(cluster, "create", pool, "alice", namespace)
    assert not can_i(cluster, "create", bs, "alice", elsewhere)
    assert can_i(cluster, "list", bs, "bob", namespace) and can_i(cluster, "get", f"{bs}/status", "bob", namespace)
    assert not can_i(cluster, "create", bs, "bob", namespace) and not can_i(cluster, "list", pool, "bob", namespace)
    assert can_i(cluster, "patch", pool, "carol", namespace) and not can_i(cluster, "list", bs, "carol", namespace)
    assert can_i(cluster, "watch", pool, "dave", namespace) and not can_i(cluster, "delete", pool, "dave", namespace)

    # Aggregated into the built-in roles: whoever may edit the namespace may create sandboxes.
    cluster.kubectl("create", "rolebinding", "erin", "-n", namespace, "--clusterrole=edit", "--user=erin")
    cluster.kubectl("create", "rolebinding", "frank", "-n", namespace, "--clusterrole=view", "--user=frank")
    deadline = time.monotonic() + 30
    while not (can_i(cluster, "create", bs, "erin", namespace) and can_i(cluster, "list", pool, "frank", namespace)):
        assert time.monotonic() < deadline, "the editor/viewer roles were not aggregated into edit/view"
        time.sleep(0.5)
    assert not can_i(cluster, "create", pool, "frank", namespace)

    # The metrics reader, bound to a scraper.
    scraper = f"{sa}:scraper"
    assert not can_i(cluster, "get", "/metrics", scraper)
    binding = f"{namespace}-scraper"
    cluster.kubectl(
        "create", "clusterrolebinding", binding, f"--clusterrole={prefix}-metrics-reader",
        f"--serviceaccount={namespace}:scraper",
    )  # fmt: skip
    try:
        assert can_i(cluster, "get", "/metrics", scraper)
    finally:
        cluster.kubectl("delete", "clusterrolebinding", binding)


@pytest.fixture
def readme_namespace(cluster: LocalCluster) -> Iterator[str]:
    """The README's namespace `opensandbox`, deleted afterwards only if this test created it."""
    existed = cluster.kubectl("get", "namespace", "opensandbox", check=False).strip() != ""
    yield "opensandbox"
    subprocess.run(
        [str(cluster.bin_dir / "helm"), "uninstall", "opensandbox-controller", "--wait"],
        env=cluster.env(),
        capture_output=True,
        check=False,
    )
    if not existed:
        cluster.kubectl("delete", "namespace", "opensandbox", "--wait=false", check=False)


def test_readme_commands_as_written(cluster: LocalCluster, readme_namespace: str) -> None:
    """The README's install from the chart directory and its troubleshooting commands, verbatim."""
    assert "opensandbox-controller" not in helm(cluster, "list", "-q"), "a release opensandbox-controller exists"
    charts = CHART.parent
    shell(
        cluster,
        """helm install opensandbox-controller ./opensandbox-controller \\
  --set controllerManager.image.repository=your-registry/opensandbox-controller \\
  --set controllerManager.image.tag=v1.0.0 \\
  --set server.image.repository=your-registry/opensandbox-server \\
  --set server.image.tag=v1.0.0 \\
  --set taskExecutor.image.repository=your-registry/opensandbox-task-executor \\
  --set taskExecutor.image.tag=v1.0.0""",
        cwd=charts,
    )
    wait_available(cluster, readme_namespace, "opensandbox-controller")
    deployments = shell(cluster, "kubectl get deployment -n opensandbox")
    ready = {line.split()[0]: line.split()[1] for line in deployments.splitlines()[1:]}
    assert ready == {"opensandbox-controller-controller-manager": "1/1", "opensandbox-controller-server": "1/1"}
    assert "Running" in shell(cluster, "kubectl get pods -n opensandbox")
    assert sorted(shell(cluster, "kubectl get crds | grep sandbox.opensandbox.io").split()[::2]) == sorted(CRDS)
    assert "Kind:         CustomResourceDefinition" in shell(
        cluster, "kubectl describe crd batchsandboxes.sandbox.opensandbox.io"
    )
    accounts = shell(cluster, "kubectl get sa -n opensandbox")
    assert "opensandbox-controller-controller-manager" in accounts and "opensandbox-controller-server" in accounts
    roles = shell(cluster, "kubectl get clusterrole | grep sandbox-k8s")
    for role in ("manager-role", "metrics-auth-role", "metrics-reader", "batchsandbox-editor-role",
                 "batchsandbox-viewer-role", "pool-editor-role", "pool-viewer-role"):  # fmt: skip
        assert f"sandbox-k8s-opensandbox-controller-{role}" in roles
    assert "sandbox-k8s-opensandbox-controller-metrics-auth-rolebinding" in shell(
        cluster, "kubectl get clusterrolebinding | grep sandbox-k8s"
    )
    shell(cluster, "helm lint ./opensandbox-controller", cwd=charts)
    rendered = shell(cluster, "helm template opensandbox-controller ./opensandbox-controller", cwd=charts)
    assert "kind: Deployment" in rendered
    shell(
        cluster,
        "helm upgrade opensandbox-controller ./opensandbox-controller --set controllerManager.image.tag=v1.1.0",
        cwd=charts,
    )
    shell(cluster, "helm uninstall opensandbox-controller")
    crds_served(cluster)


def test_dry_run_and_package(cluster: LocalCluster, tmp_path: Path) -> None:
    charts = CHART.parent
    out = shell(cluster, "helm install opensandbox-controller ./opensandbox-controller --dry-run --debug", cwd=charts)
    assert "STATUS: pending-install" in out
    package_dir = tmp_path / uuid.uuid4().hex
    package_dir.mkdir()
    shell(cluster, f"helm package ./opensandbox-controller -d {package_dir}", cwd=charts)
    assert [p.name for p in package_dir.iterdir()] == ["opensandbox-controller-0.1.0.tgz"]
