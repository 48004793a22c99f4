import datetime as dt

import pytest
from pydantic import ValidationError

from opensandbox_platform.api import labels
from opensandbox_platform.server import validation
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import CreateSandboxRequest
from opensandbox_platform.server.runtimes.base import Capabilities
from opensandbox_platform.server.runtimes.docker import DockerRuntime
from opensandbox_platform.server.runtimes.kubernetes import KubernetesRuntime
from opensandbox_platform.server.runtimes.local import LocalRuntime


@pytest.mark.parametrize(("text", "millis"), [("1", 1000), ("0.5", 500), ("250m", 250), ("2", 2000)])
def test_cpu_quantities(text: str, millis: int) -> None:
    assert validation.cpu_millis(text) == millis


@pytest.mark.parametrize(("text", "size"), [("512Mi", 512 << 20), ("2Gi", 2 << 30), ("1G", 10**9)])
def test_memory_quantities(text: str, size: int) -> None:
    assert validation.memory_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1x", "-1", "0"])
def test_bad_cpu(text: str) -> None:
    with pytest.raises(ApiError):
        validation.cpu_millis(text)


@pytest.mark.parametrize("text", ["2 apples", "100m", "1Ki"])
def test_bad_memory(text: str) -> None:
    with pytest.raises(ApiError):
        validation.memory_bytes(text)


@pytest.mark.parametrize("key", ["app", "example.com/app", "a-b_c.d"])
def test_good_label_keys(key: str) -> None:
    validation.check_metadata({key: "v"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("opensandbox.io/x", "v"), ("-bad", "v"), ("a", "has space"), ("UPPER.case/x", "v"), ("a", "x" * 64)],
)
def test_bad_labels(key: str, value: str) -> None:
    with pytest.raises(ApiError) as err:
        validation.check_metadata({key: value})
    assert err.value.status == 400 and err.value.code == "SANDBOX::INVALID_METADATA_LABEL"


def request(**fields: object) -> CreateSandboxRequest:
    body = {"image": {"uri": "ubuntu"}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600, **fields}
    return CreateSandboxRequest.model_validate(body)


def test_a_full_request_becomes_a_spec() -> None:
    spec = validation.create_spec(
        request(env={"A": "1", "DROPPED": None}, resourceLimits={"cpu": "500m", "memory": "1Gi"}, metadata={"k": "v"}),
        3600,
    )
    assert spec.env == {"A": "1"} and spec.cpu_millis == 500 and spec.memory_bytes == 1 << 30
    assert spec.timeout_seconds == 600 and spec.metadata == {"k": "v"}


@pytest.mark.parametrize(
    "fields",
    [{"timeout": 59}, {"entrypoint": []}, {"entrypoint": [""]}, {"image": {"uri": ""}}],
)
def test_the_schema_refuses_what_the_openapi_document_says(fields: dict[str, object]) -> None:
    """Non-empty entrypoint and image uri, timeout >= 60: in the model, so the OpenAPI document says so."""
    with pytest.raises(ValidationError):
        request(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"timeout": 3601},
        {"env": {"A": "a\u0000b"}},
        {"resourceLimits": {"cpu": "1000000000"}},
        {"resourceLimits": {"memory": "99999999Ti"}},
        {"snapshotId": "s"},  # with an image: exactly one of them
        {"image": None},  # neither image nor snapshotId
        {"image": None, "entrypoint": None},
        {"entrypoint": None},  # an image without an entrypoint
        {"extensions": {"poolRef": "p"}},
        {"platform": {"os": "windows", "arch": "amd64"}},
        {"networkPolicy": {"defaultAction": "deny"}},
    ],
)
def test_unsupported_or_invalid_requests(fields: dict[str, object]) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(**fields), 3600)
    assert err.value.status == 400


def test_docker_refuses_more_cpus_than_the_host_has() -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(resourceLimits={"cpu": "100000"}), 3600, DockerRuntime.capabilities)
    assert err.value.status == 400 and "CPUs" in err.value.message


NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("wanted", "ok"),
    [
        (NOW + dt.timedelta(seconds=30), True),
        (NOW + dt.timedelta(seconds=3600), True),
        (NOW + dt.timedelta(seconds=3601), False),
        (NOW, False),
        (NOW - dt.timedelta(days=1), False),
        (dt.datetime(9999, 12, 31), False),
        (dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=23))), False),
        ((NOW + dt.timedelta(minutes=5)).replace(tzinfo=None), True),  # no zone: UTC
    ],
)
def test_renew_must_be_in_the_future_and_within_the_max_timeout(wanted: dt.datetime, ok: bool) -> None:
    if ok:
        assert validation.renewed_expiry(wanted, NOW, 3600).tzinfo is not None
    else:
        with pytest.raises(ApiError) as err:
            validation.renewed_expiry(wanted, NOW, 3600)
        assert (err.value.status, err.value.code) == (400, "SANDBOX::INVALID_EXPIRATION")


def test_null_timeout_means_no_expiry() -> None:
    assert validation.create_spec(request(timeout=None), 3600).timeout_seconds is None


# -- what each runtime supports ------------------------------------------------------------------

LOCAL = LocalRuntime.capabilities
DOCKER = DockerRuntime.capabilities
KUBERNETES = KubernetesRuntime.capabilities


@pytest.mark.parametrize(
    ("capabilities", "fields", "named"),
    [
        (LOCAL, {"resourceRequests": {"cpu": "1"}}, "resourceRequests is not supported by the local runtime"),
        (LOCAL, {"extensions": {"poolRef": "p"}}, "extensions.poolRef is not supported by the local runtime"),
        (DOCKER, {"extensions": {"poolRef": "p"}}, "extensions.poolRef is not supported by the docker runtime"),
        (
            KUBERNETES,
            {"extensions": {"poolRef": "p"}, "image": {"uri": "u", "auth": {"username": "a", "password": "b"}}},
            "image.auth is not supported with extensions.poolRef: a warm pod's image is the Pool's"
            " (put its pull secret in the Pool's template, or create without poolRef)",
        ),
        (
            KUBERNETES,
            {"extensions": {"poolRef": "p"}, "resourceRequests": {"cpu": "1"}},
            "resourceRequests is not supported with extensions.poolRef: a claimed pod's resources are the Pool's",
        ),
    ],
)
def test_a_field_the_runtime_cannot_honour_is_refused_by_name(
    capabilities: Capabilities, fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(**fields), 3600, capabilities)
    assert (err.value.status, err.value.code, err.value.message) == (400, "SANDBOX::API_NOT_SUPPORTED", named)


@pytest.mark.parametrize(
    ("capabilities", "fields"),
    [
        (KUBERNETES, {"extensions": {"poolRef": "p"}}),
        (KUBERNETES, {"resourceRequests": {"cpu": "1"}}),
        (DOCKER, {"image": {"uri": "u", "auth": {"username": "a", "password": "b"}}}),
        (LOCAL, {"image": {"uri": "u", "auth": {"username": "a", "password": "b"}}}),  # as before: nothing is pulled
    ],
)
def test_what_the_runtime_supports_passes(capabilities: Capabilities, fields: dict[str, object]) -> None:
    validation.create_spec(request(**fields), 3600, capabilities)


@pytest.mark.parametrize("capabilities", [LOCAL, DOCKER, KUBERNETES])
def test_a_limit_no_runtime_enforces_is_refused_not_dropped(capabilities: Capabilities) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(resourceLimits={"cpu": "1", "nvidia.com/gpu": "1"}), 3600, capabilities)
    assert err.value.code == "SANDBOX::API_NOT_SUPPORTED" and "resourceLimits.nvidia.com/gpu" in err.value.message


def test_resource_requests_become_millis_and_bytes() -> None:
    spec = validation.create_spec(
        request(resourceRequests={"cpu": "250m", "memory": "512Mi"}, resourceLimits={"cpu": "1"}), 3600, KUBERNETES
    )
    assert (spec.cpu_request_millis, spec.memory_request_bytes) == (250, 512 << 20)
    assert (spec.cpu_millis, spec.memory_bytes) == (1000, None)
    unset = validation.create_spec(request(), 3600, KUBERNETES)
    assert (unset.cpu_request_millis, unset.memory_request_bytes) == (None, None)


@pytest.mark.parametrize(
    ("requests", "limits", "mentions"),
    [
        ({"cpu": "lots"}, {}, "resourceRequests.cpu 'lots' is not a CPU quantity"),
        ({"memory": "1Ki"}, {}, "resourceRequests.memory must be at least 16Mi"),
        ({"gpu": "1"}, {}, "resourceRequests.gpu: only cpu and memory"),
        ({"cpu": "2"}, {"cpu": "1"}, "resourceRequests.cpu must not exceed resourceLimits.cpu"),
        ({"memory": "2Gi"}, {"memory": "1Gi"}, "resourceRequests.memory must not exceed resourceLimits.memory"),
    ],
)
def test_bad_resource_requests(requests: dict[str, str], limits: dict[str, str], mentions: str) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(resourceRequests=requests, resourceLimits=limits), 3600, KUBERNETES)
    assert err.value.code == "SANDBOX::INVALID_PARAMETER" and mentions in err.value.message


# -- reserved metadata and names, the same on every runtime ----------------------------------------


@pytest.mark.parametrize("prefix", labels.RESERVED_PREFIXES)
@pytest.mark.parametrize("capabilities", [LOCAL, DOCKER, KUBERNETES])
def test_reserved_prefixes_are_refused_on_every_runtime(prefix: str, capabilities: Capabilities) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(metadata={f"{prefix}x": "y"}), 3600, capabilities)
    assert (
        err.value.code == "SANDBOX::INVALID_METADATA_LABEL" and f"the prefix {prefix} is reserved" in err.value.message
    )
    with pytest.raises(ApiError):
        validation.check_metadata({f"{prefix}created-by": None})  # a patch that would delete one


def test_names_around_the_reserved_prefixes_are_the_users() -> None:
    validation.check_metadata({"example.opensandbox.io/x": "v", "opensandbox.io.example.com/x": "v"})


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("warm", True),
        ("a.b-c.d", True),
        ("a" * 63, True),
        (".".join(["a" * 63] * 3) + "." + "a" * 61, True),  # 253 characters
        ("", False),
        ("Warm", False),
        ("-a", False),
        ("a..b", False),
        ("a" * 64, False),  # one DNS label is at most 63
        (".".join(["a" * 63] * 4), False),  # 255 characters
        ("Not A Name", False),
    ],
)
def test_dns_subdomains(name: str, valid: bool) -> None:
    assert validation.is_dns_subdomain(name) is valid


HOOKS = {"preStart": {"command": ["true"]}, "periodic": [{"name": "t", "schedule": "@every 1s", "command": ["true"]}]}


def test_lifecycle_hooks_pass_where_execd_runs_them_and_are_refused_with_a_pool_ref() -> None:
    for capabilities in (LOCAL, DOCKER, KUBERNETES):
        spec = validation.create_spec(request(lifecycle=HOOKS), 3600, capabilities)
        assert spec.lifecycle is not None and spec.lifecycle["preStart"] == {"command": ["true"], "timeoutSeconds": 60}
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(lifecycle=HOOKS, extensions={"poolRef": "p"}), 3600, KUBERNETES)
    assert err.value.code == "SANDBOX::API_NOT_SUPPORTED"
    assert err.value.message.startswith("lifecycle is not supported with extensions.poolRef")


@pytest.mark.parametrize(
    ("hooks", "field"),
    [
        (
            {"periodic": [{"name": "t", "schedule": "*/0 * * * *", "command": ["true"]}]},
            "lifecycle.periodic[0].schedule",
        ),
        ({"preStart": {"command": ["true"], "timeoutSeconds": 3 * 3600 + 1}}, "lifecycle.preStart.timeoutSeconds"),
        ({"preStart": {"command": []}}, "lifecycle.preStart.command"),
    ],
)
def test_bad_lifecycle_hooks_are_400_naming_the_field(hooks: dict[str, object], field: str) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(lifecycle=hooks), 3600, LOCAL)
    assert (err.value.status, err.value.code) == (400, "SANDBOX::INVALID_PARAMETER")
    assert err.value.message.startswith(field)
