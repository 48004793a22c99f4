from pathlib import Path

import pytest
from pydantic import ValidationError

from opensandbox_platform.server import config as configuration
from opensandbox_platform.server.main import main


def test_defaults_need_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(configuration.CONFIG_ENV, raising=False)
    monkeypatch.delenv(configuration.API_KEY_ENV, raising=False)
    config = configuration.load(None)
    assert (config.server.host, config.server.port, config.server.api_key) == ("127.0.0.1", 8080, "")
    assert config.runtime.type == "local"


def test_chart_and_upstream_spellings_are_both_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\napiKey = "a"\nlogLevel = "DEBUG"\nport = 9000\n'
        '[runtime]\nexecd_image = "x/execd:1"\n[kubernetes]\nworkloadProvider = "batchsandbox"\nnamespace = "ns"\n'
    )
    config = configuration.load(path)
    assert (config.server.api_key, config.server.log_level, config.server.port) == ("a", "DEBUG", 9000)
    assert config.runtime.execd_image == "x/execd:1" and config.kubernetes.namespace == "ns"


@pytest.mark.parametrize(
    "text", ['[server]\napikey = "typo"\n', "[server]\nport = 0\n", '[runtime]\ntype = "podman"\n', "[server\n"]
)
def test_bad_files_are_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(configuration.ConfigError):
        configuration.load(path)


def test_env_overrides_the_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(configuration.API_KEY_ENV, "from-env")
    assert configuration.load(None).server.api_key == "from-env"


def test_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert configuration.Config().state_dir() == tmp_path / "opensandbox" / "local"


def test_init_config_writes_the_defaults_and_random_keys(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.toml"
    with pytest.raises(SystemExit) as done:
        main(["init-config", str(path)])
    assert done.value.code == 0
    text = path.read_text()
    assert "apiKey" in text and "# " in text
    assert path.stat().st_mode & 0o077 == 0  # the key is the operator's only
    loaded = configuration.load(path)
    assert len(loaded.server.api_key) >= 32
    (signing,) = loaded.server.signing_keys
    assert signing.id == "k1" and len(signing.secret) >= 32 and signing.retire_at is None
    loaded.server.api_key = ""
    loaded.server.signing_keys = []
    assert loaded == configuration.Config()
    other = tmp_path / "other.toml"
    with pytest.raises(SystemExit):
        main(["init-config", str(other)])
    assert configuration.load(other).server.api_key != configuration.load(path).server.api_key
    with pytest.raises(SystemExit) as again:
        main(["init-config", str(path)])
    assert again.value.code == 1  # no silent overwrite


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False)],
)
def test_which_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert configuration.is_loopback(host) is loopback


def test_a_key_less_server_on_a_public_address_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import opensandbox_platform.server.main as server_main

    monkeypatch.delenv(configuration.API_KEY_ENV, raising=False)
    monkeypatch.setattr(server_main, "create_app", lambda config, runtime: None)
    monkeypatch.setattr(server_main, "default_runtime", lambda config, path: None)
    monkeypatch.setattr(server_main.uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(server_main.logs, "setup", lambda level: None)
    with caplog.at_level("WARNING"):
        server_main.main(["--host", "0.0.0.0"])
    assert "without an API key" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        server_main.main(["--host", "127.0.0.1"])
    assert "without an API key" not in caplog.text


def test_signing_keys_need_one_that_signs_and_unique_ids() -> None:
    secret = "s" * 32
    retired = {"id": "old", "secret": secret, "retireAt": "2026-01-01T00:00:00Z"}
    with pytest.raises(ValidationError):
        configuration.Config.model_validate({"server": {"signingKeys": [retired]}})
    with pytest.raises(ValidationError):
        configuration.Config.model_validate({"server": {"signingKeys": [{"id": "a", "secret": secret}] * 2}})
    with pytest.raises(ValidationError):
        configuration.Config.model_validate({"server": {"signingKeys": [{"id": "a", "secret": "short"}]}})
    ok = configuration.Config.model_validate({"server": {"signingKeys": [{"id": "new", "secret": secret}, retired]}})
    assert [key.id for key in ok.server.signing_keys] == ["new", "old"]
