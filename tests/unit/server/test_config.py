from pathlib import Path

import pytest

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


def test_init_config_writes_a_file_that_loads_to_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.toml"
    with pytest.raises(SystemExit) as done:
        main(["init-config", str(path)])
    assert done.value.code == 0
    text = path.read_text()
    assert "apiKey" in text and "# " in text
    assert configuration.load(path) == configuration.Config()
    with pytest.raises(SystemExit) as again:
        main(["init-config", str(path)])
    assert again.value.code == 1  # no silent overwrite
