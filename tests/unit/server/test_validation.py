import pytest

from opensandbox_platform.server import validation
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import CreateSandboxRequest


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
    [
        {"timeout": 59},
        {"timeout": 3601},
        {"entrypoint": []},
        {"entrypoint": [""]},
        {"image": None},
        {"snapshotId": "s"},
        {"secureAccess": True},
        {"extensions": {"poolRef": "p"}},
        {"platform": {"os": "windows", "arch": "amd64"}},
        {"networkPolicy": {"defaultAction": "deny"}},
    ],
)
def test_unsupported_or_invalid_requests(fields: dict[str, object]) -> None:
    with pytest.raises(ApiError) as err:
        validation.create_spec(request(**fields), 3600)
    assert err.value.status == 400


def test_null_timeout_means_no_expiry() -> None:
    assert validation.create_spec(request(timeout=None), 3600).timeout_seconds is None
