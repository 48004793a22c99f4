"""`helm template` of charts/opensandbox-controller: every documented parameter has its effect.

The parameters are those of the chart README's tables (the seed's); each has a case below that sets
it and says what the rendered manifests must show. A parameter without a case, or a case without a
parameter, fails the test, as does a README default that differs from values.yaml.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import yaml

from opensandbox_platform.server.config import Config
from tests.unit.chart.helm import CHART, RELEASE, Doc, find, get, helm, render, render_error

CONTROLLER = f"{RELEASE}-controller-manager"
SERVER = f"{RELEASE}-server"
METRICS = f"{CONTROLLER}-metrics-service"
CLUSTER = f"sandbox-k8s-{RELEASE}"
REJECTED = object()  # the schema refuses any other value: that is the parameter's effect


def controller(docs: list[Doc]) -> Doc:
    container: Doc = get(docs, "Deployment", CONTROLLER)["spec"]["template"]["spec"]["containers"][0]
    return container


def server(docs: list[Doc]) -> Doc:
    container: Doc = get(docs, "Deployment", SERVER)["spec"]["template"]["spec"]["containers"][0]
    return container


def flag(container: Doc, name: str) -> str | bool:
    """The value of --name=value, True for a bare --name, False when absent."""
    for arg in container["args"]:
        if arg == name:
            return True
        if arg.startswith(name + "="):
            return str(arg.split("=", 1)[1])
    return False


def toml(docs: list[Doc]) -> dict[str, Any]:
    return tomllib.loads(get(docs, "ConfigMap", f"{SERVER}-config")["data"]["config.toml"])


def names(docs: list[Doc], *kinds: str) -> list[str]:
    return sorted(d["metadata"]["name"] for d in docs if d["kind"] in kinds)


def limit(container: Doc, kind: str, name: str) -> str:
    return str(container["resources"][kind][name])


@dataclass
class Case:
    sets: dict[str, str]
    observe: Callable[[list[Doc]], Any]
    expected: Any
    extra: list[str] = field(default_factory=list)


def api_key(docs: list[Doc]) -> tuple[str | None, bool, bool]:
    secret = find(docs, "Secret", f"{SERVER}-api-key")
    value = base64.b64decode(secret["data"]["api-key"]).decode() if secret else None
    env = [e["name"] for e in server(docs).get("env", [])]
    return value, "OPENSANDBOX_SERVER_API_KEY" in env, "apiKey" in toml(docs)["server"]


def metrics_token(docs: list[Doc]) -> str | None:
    secret = find(docs, "Secret", f"{SERVER}-metrics-token")
    return base64.b64decode(secret["data"]["token"]).decode() if secret else None


def server_monitor(monitor: Doc) -> tuple[str, str, str, str, str | None]:
    endpoint = monitor["spec"]["endpoints"][0]
    secret = endpoint.get("authorization", {}).get("credentials", {}).get("name")
    component = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
    return monitor["metadata"]["name"], endpoint["port"], endpoint["path"], component, secret


def namespaces(docs: list[Doc]) -> set[str]:
    return {d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]}


def service_accounts(docs: list[Doc]) -> tuple[list[str], str, str]:
    ctrl = get(docs, "Deployment", CONTROLLER)["spec"]["template"]["spec"]["serviceAccountName"]
    srv = get(docs, "Deployment", SERVER)["spec"]["template"]["spec"]["serviceAccountName"]
    return names(docs, "ServiceAccount"), ctrl, srv


def binding_subjects(docs: list[Doc]) -> set[str]:
    return {s["name"] for d in docs if d["kind"].endswith("Binding") for s in d["subjects"]}


CASES: dict[str, Case] = {
    # controller
    "controllerManager.image.repository": Case(
        {"controllerManager.image.repository": "myregistry.com/sandbox-controller"},
        lambda d: controller(d)["image"],
        "myregistry.com/sandbox-controller:dev",
    ),
    "controllerManager.image.tag": Case(
        {"controllerManager.image.tag": "v1.1.0"}, lambda d: controller(d)["image"], "opensandbox/controller:v1.1.0"
    ),
    "controllerManager.image.pullPolicy": Case(
        {"controllerManager.image.pullPolicy": "IfNotPresent"},
        lambda d: controller(d)["imagePullPolicy"],
        "IfNotPresent",
    ),
    "controllerManager.replicas": Case(
        {"controllerManager.replicas": "3"}, lambda d: get(d, "Deployment", CONTROLLER)["spec"]["replicas"], 3
    ),
    "controllerManager.resources.limits.cpu": Case(
        {"controllerManager.resources.limits.cpu": "1"}, lambda d: limit(controller(d), "limits", "cpu"), "1"
    ),
    "controllerManager.resources.limits.memory": Case(
        {"controllerManager.resources.limits.memory": "256Mi"},
        lambda d: limit(controller(d), "limits", "memory"),
        "256Mi",
    ),
    "controllerManager.resources.requests.cpu": Case(
        {"controllerManager.resources.requests.cpu": "100m"},
        lambda d: limit(controller(d), "requests", "cpu"),
        "100m",
    ),
    "controllerManager.resources.requests.memory": Case(
        {"controllerManager.resources.requests.memory": "100Mi"},
        lambda d: limit(controller(d), "requests", "memory"),
        "100Mi",
    ),
    "controllerManager.leaderElect": Case(
        {"controllerManager.leaderElect": "false"}, lambda d: flag(controller(d), "--leader-elect"), False
    ),
    "controllerManager.logLevel": Case(
        {"controllerManager.logLevel": "5"}, lambda d: flag(controller(d), "--log-level"), "5"
    ),
    # task executor: the controller's defaults for the sidecar
    "taskExecutor.image.repository": Case(
        {"taskExecutor.image.repository": "reg.example/te"},
        lambda d: flag(controller(d), "--task-executor-image"),
        "reg.example/te:dev",
    ),
    "taskExecutor.image.tag": Case(
        {"taskExecutor.image.tag": "v1.0.0"},
        lambda d: flag(controller(d), "--task-executor-image"),
        "opensandbox/task-executor:v1.0.0",
    ),
    "taskExecutor.image.pullPolicy": Case(
        {"taskExecutor.image.pullPolicy": "IfNotPresent"},
        lambda d: flag(controller(d), "--task-executor-image-pull-policy"),
        "IfNotPresent",
    ),
    # egress sidecar: the controller injects it into pods of sandboxes with a networkPolicy
    "egress.image.repository": Case(
        {"egress.image.repository": "reg.example/egress"},
        lambda d: flag(controller(d), "--egress-image"),
        "reg.example/egress:dev",
    ),
    "egress.image.tag": Case(
        {"egress.image.tag": "v1.0.0"}, lambda d: flag(controller(d), "--egress-image"), "opensandbox/egress:v1.0.0"
    ),
    "egress.image.pullPolicy": Case(
        {"egress.image.pullPolicy": "IfNotPresent"},
        lambda d: flag(controller(d), "--egress-image-pull-policy"),
        "IfNotPresent",
    ),
    **{
        f"taskExecutor.resources.{kind}.{name}": Case(
            {f"taskExecutor.resources.{kind}.{name}": value},
            partial(
                lambda d, flag_name: flag(controller(d), flag_name), flag_name=f"--task-executor-{name}-{kind[:-1]}"
            ),
            value,
        )
        for kind, name, value in [
            ("limits", "cpu", "2"),
            ("limits", "memory", "1Gi"),
            ("requests", "cpu", "50m"),
            ("requests", "memory", "64Mi"),
        ]
    },
    # server
    "server.enabled": Case(
        {"server.enabled": "false"},
        lambda d: [f"{x['kind']}/{x['metadata']['name']}" for x in d if SERVER in x["metadata"]["name"]],
        [],
    ),
    "server.image.repository": Case(
        {"server.image.repository": "reg.example/server"}, lambda d: server(d)["image"], "reg.example/server:v0.1.0"
    ),
    "server.image.tag": Case({"server.image.tag": "v1.0.0"}, lambda d: server(d)["image"], "opensandbox/server:v1.0.0"),
    "server.image.pullPolicy": Case(
        {"server.image.pullPolicy": "Always"}, lambda d: server(d)["imagePullPolicy"], "Always"
    ),
    "server.replicas": Case({"server.replicas": "2"}, lambda d: get(d, "Deployment", SERVER)["spec"]["replicas"], 2),
    "server.resources.limits.cpu": Case(
        {"server.resources.limits.cpu": "2"}, lambda d: limit(server(d), "limits", "cpu"), "2"
    ),
    "server.resources.limits.memory": Case(
        {"server.resources.limits.memory": "1Gi"}, lambda d: limit(server(d), "limits", "memory"), "1Gi"
    ),
    "server.resources.requests.cpu": Case(
        {"server.resources.requests.cpu": "200m"}, lambda d: limit(server(d), "requests", "cpu"), "200m"
    ),
    "server.resources.requests.memory": Case(
        {"server.resources.requests.memory": "300Mi"}, lambda d: limit(server(d), "requests", "memory"), "300Mi"
    ),
    "server.config.server.host": Case(
        {"server.config.server.host": "127.0.0.1"}, lambda d: toml(d)["server"]["host"], "127.0.0.1"
    ),
    "server.config.server.port": Case(
        {"server.config.server.port": "9090"},
        lambda d: (toml(d)["server"]["port"], server(d)["ports"][0]["containerPort"]),
        (9090, 9090),
    ),
    "server.config.server.logLevel": Case(
        {"server.config.server.logLevel": "DEBUG"}, lambda d: toml(d)["server"]["logLevel"], "DEBUG"
    ),
    "server.config.server.apiKey": Case({"server.config.server.apiKey": "s3cret"}, api_key, ("s3cret", True, False)),
    "server.config.runtime.type": Case(
        {"server.config.runtime.type": "docker"}, lambda d: toml(d)["runtime"]["type"], "docker"
    ),
    "server.config.runtime.execdImage": Case(
        {"server.config.runtime.execdImage": "reg.example/execd:v2"},
        lambda d: (toml(d)["runtime"]["execdImage"], flag(controller(d), "--execd-image")),
        ("reg.example/execd:v2", "reg.example/execd:v2"),
    ),
    "server.config.kubernetes.workloadProvider": Case(
        {"server.config.kubernetes.workloadProvider": "deployment"}, lambda d: None, REJECTED
    ),
    "server.service.type": Case(
        {"server.service.type": "LoadBalancer"}, lambda d: get(d, "Service", SERVER)["spec"]["type"], "LoadBalancer"
    ),
    "server.service.port": Case(
        {"server.service.port": "80"}, lambda d: get(d, "Service", SERVER)["spec"]["ports"][0]["port"], 80
    ),
    "server.service.nodePort": Case(
        {"server.service.type": "NodePort", "server.service.nodePort": "30080"},
        lambda d: get(d, "Service", SERVER)["spec"]["ports"][0].get("nodePort"),
        30080,
    ),
    "server.ingress.enabled": Case(
        {"server.ingress.enabled": "true"},
        lambda d: find(d, "Ingress", SERVER) is not None,
        True,
    ),
    "server.ingress.className": Case(
        {"server.ingress.enabled": "true", "server.ingress.className": "nginx"},
        lambda d: (find(d, "Ingress", SERVER) or {}).get("spec", {}).get("ingressClassName"),
        "nginx",
    ),
    "server.ingress.hosts": Case(
        {
            "server.ingress.enabled": "true",
            "server.ingress.hosts[0].host": "opensandbox.example.com",
            "server.ingress.hosts[0].paths[0].path": "/",
            "server.ingress.hosts[0].paths[0].pathType": "Prefix",
        },
        lambda d: [
            (r["host"], p["path"], p["pathType"], p["backend"]["service"]["name"])
            for r in (find(d, "Ingress", SERVER) or {}).get("spec", {}).get("rules", [])
            for p in r["http"]["paths"]
        ],
        [("opensandbox.example.com", "/", "Prefix", SERVER)],
    ),
    "server.metrics.token": Case(
        {"server.metrics.token": "scrape-me"},
        lambda d: (metrics_token(d), [e["name"] for e in server(d).get("env", [])]),
        ("scrape-me", ["OPENSANDBOX_SERVER_METRICS_TOKEN"]),
    ),
    "server.metrics.serviceMonitor.enabled": Case(
        {"server.metrics.serviceMonitor.enabled": "true"},
        lambda d: [server_monitor(m) for m in d if m["kind"] == "ServiceMonitor"],
        [(f"{SERVER}-metrics-monitor", "http", "/metrics", "server", None)],
    ),
    "server.metrics.serviceMonitor.interval": Case(
        {"server.metrics.serviceMonitor.enabled": "true", "server.metrics.serviceMonitor.interval": "15s"},
        lambda d: [e["interval"] for m in d if m["kind"] == "ServiceMonitor" for e in m["spec"]["endpoints"]],
        ["15s"],
    ),
    # Grafana dashboard
    "dashboard.enabled": Case(
        {"dashboard.enabled": "true"},
        lambda d: json.loads(
            (find(d, "ConfigMap", f"{RELEASE}-dashboard") or {"data": {"opensandbox.json": "{}"}})["data"][
                "opensandbox.json"
            ]
        ).get("uid"),
        "opensandbox",
    ),
    "dashboard.namespace": Case(
        {"dashboard.enabled": "true", "dashboard.namespace": "monitoring"},
        lambda d: (find(d, "ConfigMap", f"{RELEASE}-dashboard") or {"metadata": {}})["metadata"].get("namespace"),
        "monitoring",
    ),
    "dashboard.labels.grafana_dashboard": Case(
        {"dashboard.enabled": "true", "dashboard.labels.grafana_dashboard": "str:opensandbox"},
        lambda d: (find(d, "ConfigMap", f"{RELEASE}-dashboard") or {"metadata": {"labels": {}}})["metadata"][
            "labels"
        ].get("grafana_dashboard"),
        "opensandbox",
    ),
    # namespace
    "namespaceOverride": Case(
        {"namespaceOverride": "sandboxes"},
        lambda d: (namespaces(d), names(d, "Namespace"), flag(controller(d), "--namespace"), toml(d)["kubernetes"]),
        (
            {"sandboxes"},
            ["sandboxes"],
            "sandboxes",
            {
                "namespace": "sandboxes",
                "workloadProvider": "batchsandbox",
                "sandboxTokenKeyFile": "/etc/opensandbox-sandbox-token/key",
            },
        ),
    ),
    # RBAC
    "rbac.create": Case(
        {"rbac.create": "false"}, lambda d: names(d, "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"), []
    ),
    "rbac.serviceAccount.create": Case(
        {"rbac.serviceAccount.create": "false"}, service_accounts, ([], "default", "default")
    ),
    "rbac.serviceAccount.name": Case(
        {"rbac.serviceAccount.name": "sandboxes"},
        lambda d: (service_accounts(d), binding_subjects(d)),
        ((["sandboxes", "sandboxes-server"], "sandboxes", "sandboxes-server"), {"sandboxes", "sandboxes-server"}),
    ),
    # metrics
    "metrics.enabled": Case(
        {"metrics.enabled": "false"},
        lambda d: (
            names(d, "Service"),
            flag(controller(d), "--metrics-bind-address"),
            find(d, "Secret", f"{RELEASE}-metrics-cert") is not None,
        ),
        ([SERVER], "0", False),
    ),
    "metrics.service.type": Case(
        {"metrics.service.type": "NodePort"}, lambda d: get(d, "Service", METRICS)["spec"]["type"], "NodePort"
    ),
    "metrics.service.port": Case(
        {"metrics.service.port": "9443"}, lambda d: get(d, "Service", METRICS)["spec"]["ports"][0]["port"], 9443
    ),
    "metrics.serviceMonitor.enabled": Case(
        {"metrics.serviceMonitor.enabled": "true"},
        lambda d: names(d, "ServiceMonitor"),
        [f"{CONTROLLER}-metrics-monitor"],
    ),
    "metrics.serviceMonitor.interval": Case(
        {"metrics.serviceMonitor.enabled": "true", "metrics.serviceMonitor.interval": "1m"},
        lambda d: [e["interval"] for m in d if m["kind"] == "ServiceMonitor" for e in m["spec"]["endpoints"]],
        ["1m"],
    ),
    # CRDs
    "crds.install": Case({"crds.install": "false"}, lambda d: names(d, "CustomResourceDefinition"), []),
    # extra roles
    **{
        f"extraRoles.{key}.enabled": Case(
            {f"extraRoles.{key}.enabled": "false"},
            partial(lambda d, role: f"{CLUSTER}-{role}" in names(d, "ClusterRole"), role=role),
            False,
        )
        for key, role in [
            ("batchsandboxEditor", "batchsandbox-editor-role"),
            ("batchsandboxViewer", "batchsandbox-viewer-role"),
            ("poolEditor", "pool-editor-role"),
            ("poolViewer", "pool-viewer-role"),
        ]
    },
}


def readme_parameters() -> dict[str, str]:
    """`parameter` -> `default` from the README's parameter tables."""
    rows = re.findall(r"^\| `([A-Za-z][\w.]*)` \| .* \| `(.*)` \|$", (CHART / "README.md").read_text(), re.M)
    return dict(rows)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


@pytest.fixture(scope="module")
def defaults() -> list[Doc]:
    return render()


def test_every_documented_parameter_has_a_case() -> None:
    assert sorted(CASES) == sorted(readme_parameters())


def test_values_yaml_has_exactly_the_documented_keys_and_defaults() -> None:
    values = leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    documented = readme_parameters()
    assert sorted(values) == sorted(documented)
    for key, text in documented.items():
        assert str(yaml.safe_load(text)) == str(values[key]), key


@pytest.mark.parametrize("parameter", sorted(CASES))
def test_parameter_has_its_effect(parameter: str, defaults: list[Doc]) -> None:
    case = CASES[parameter]
    assert parameter in case.sets or any(k.startswith(parameter + "[") for k in case.sets)
    if case.expected is REJECTED:
        assert "schema" in render_error(case.sets)
        return
    assert case.observe(defaults) != case.expected, "the default already shows the changed value"
    assert case.observe(render(case.sets, *case.extra)) == case.expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"controllerManager.replicas": "str:three"}, "replicas"),
        ({"server.service.type": "ExternalName"}, "type"),
        ({"metrics.service.type": "Headless"}, "type"),
        ({"controllerManager.logLevel": "9"}, "logLevel"),
        ({"controllerManager.leaderElect": "str:yes"}, "leaderElect"),
        ({"server.config.server.port": "str:8080"}, "port"),
        ({"server.config.server.logLevel": "verbose"}, "logLevel"),
        ({"controllerManager.image.pullPolicy": "Sometimes"}, "pullPolicy"),
        ({"server.ingress.hosts[0].paths[0].path": "no-slash"}, "path"),
        ({"metrics.serviceMonitor.interval": "soon"}, "interval"),
        ({"controllerManager.replica": "3"}, "replica"),  # a typo is not ignored
        ({"crds.keep": "true"}, "keep"),
    ],
)
def test_schema_rejects(values: dict[str, str], message: str) -> None:
    error = render_error(values)
    assert "schema" in error and message in error, error


def test_lint_strict() -> None:
    out = helm("lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out, out


def test_chart_crds_equal_print_crds(defaults: list[Doc]) -> None:
    printed = subprocess.run(
        ["opensandbox-controller", "print-crds"], text=True, capture_output=True, check=True
    ).stdout
    assert (CHART / "files" / "crds.yaml").read_text() == printed, "the chart's CRDs are stale: run `make crds`"
    generated = {d["metadata"]["name"]: d for d in yaml.safe_load_all(printed) if d}
    rendered = {d["metadata"]["name"]: d for d in defaults if d["kind"] == "CustomResourceDefinition"}
    assert sorted(rendered) == sorted(generated)
    for name, crd in rendered.items():
        assert crd["spec"] == generated[name]["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_everything_namespaced_is_in_the_chart_namespace(defaults: list[Doc]) -> None:
    assert namespaces(defaults) == {"opensandbox"}
    assert names(defaults, "Namespace") == ["opensandbox"]
    assert get(defaults, "Namespace", "opensandbox")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_server_config_is_a_valid_server_file() -> None:
    docs = render(
        {
            "server.config.server.maxSandboxTimeoutSeconds": "3600",
            "server.config.kubernetes.defaultPodSpec.nodeSelector.disk": "ssd",
            "server.config.kubernetes.defaultPodSpec.tolerations[0].key": "dedicated",
            "server.config.kubernetes.defaultPodSpec.tolerations[0].operator": "Exists",
            "server.config.server.eip": 'str:a "quoted" host',
        }
    )
    data = toml(docs)
    config = Config.model_validate(data)
    assert config.runtime.type == "kubernetes"
    assert config.kubernetes.namespace == "opensandbox"
    assert config.server.max_sandbox_timeout_seconds == 3600
    assert config.server.eip == 'a "quoted" host'
    assert data["kubernetes"]["defaultPodSpec"] == {
        "nodeSelector": {"disk": "ssd"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
    }
    assert server(docs)["args"] == ["--config", "/etc/opensandbox/config.toml"]


def test_controller_pod_is_restricted(defaults: list[Doc]) -> None:
    pod = get(defaults, "Deployment", CONTROLLER)["spec"]["template"]
    assert pod["metadata"]["labels"]["control-plane"] == "controller-manager"
    container = pod["spec"]["containers"][0]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8081}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8081}
    assert flag(container, "--metrics-cert-dir") == "/etc/opensandbox/metrics-cert"


def test_a_request_above_its_limit_raises_the_limit() -> None:
    docs = render({"controllerManager.resources.requests.memory": "256Mi", "server.resources.requests.cpu": "1500m"})
    assert limit(controller(docs), "limits", "memory") == "256Mi"
    assert limit(server(docs), "limits", "cpu") == "1500m"
    assert limit(controller(docs), "limits", "cpu") == "500m"


def test_the_sandbox_token_key_reaches_the_controller_and_the_server() -> None:
    """One Secret, mounted in both, named by the controller's flag and the server's config."""
    docs = render()
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-sandbox-token-key")]
    assert len(secret["data"]["key"]) >= 48
    assert flag(controller(docs), "--sandbox-token-key-file") == "/etc/opensandbox-sandbox-token/key"
    assert toml(docs)["kubernetes"]["sandboxTokenKeyFile"] == "/etc/opensandbox-sandbox-token/key"
    for name in (CONTROLLER, SERVER):
        volumes = get(docs, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "sandbox-token", "secret": {"secretName": secret["metadata"]["name"]}} in volumes


def test_the_servers_monitor_authenticates_with_the_metrics_token_and_never_the_api_key() -> None:
    docs = render(
        {
            "server.config.server.apiKey": "the-key",
            "server.metrics.token": "scrape-me",
            "server.metrics.serviceMonitor.enabled": "true",
        }
    )
    monitor = get(docs, "ServiceMonitor", f"{SERVER}-metrics-monitor")
    assert server_monitor(monitor)[4] == f"{SERVER}-metrics-token"
    assert "the-key" not in yaml.safe_dump(monitor)
    env = [e["name"] for e in server(docs)["env"]]
    assert env == ["OPENSANDBOX_SERVER_API_KEY", "OPENSANDBOX_SERVER_METRICS_TOKEN"]
    assert "metricsToken" not in toml(docs)["server"]  # a secret, never in the ConfigMap


def test_a_server_monitor_without_a_token_where_the_key_is_needed_is_refused() -> None:
    error = render_error({"server.config.server.apiKey": "the-key", "server.metrics.serviceMonitor.enabled": "true"})
    assert "server.metrics.token" in error


def test_the_dashboard_configmap_carries_the_dashboard_file() -> None:
    docs = render({"dashboard.enabled": "true"})
    shipped = get(docs, "ConfigMap", f"{RELEASE}-dashboard")["data"]["opensandbox.json"]
    assert json.loads(shipped) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_the_server_reads_no_secret_but_the_snapshot_registrys() -> None:
    def secret_rules(docs: list[Doc]) -> list[dict[str, Any]]:
        role = find(docs, "Role", f"{RELEASE}-server-role")
        return [r for r in role["rules"] if "secrets" in r.get("resources", [])]

    assert [r["verbs"] for r in secret_rules(render())] == [["create", "patch", "delete"]]
    named = secret_rules(render({"server.config.kubernetes.snapshotRegistrySecret": "regcred"}))
    assert [(r["verbs"], r.get("resourceNames")) for r in named] == [
        (["create", "patch", "delete"], None),
        (["get"], ["regcred"]),
    ]
