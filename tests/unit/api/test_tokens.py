"""Per-pod tokens: derived, not stored; one pod's token says nothing of another's."""

from __future__ import annotations

import pytest

from opensandbox_platform.api import tokens


def test_a_pods_token_is_derived_from_the_key_and_its_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = b"k" * 32
    assert tokens.pod_token(key, "pool-abcde") == tokens.pod_token(key, "pool-abcde")
    assert tokens.pod_token(key, "pool-abcde") != tokens.pod_token(key, "pool-abcdf")
    assert tokens.pod_token(key, "pool-abcde") != tokens.pod_token(b"j" * 32, "pool-abcde")
    path = tmp_path / "key"
    path.write_text("short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        tokens.read_key(path)
    path.write_text("x" * 40 + "\n")
    assert tokens.read_key(path) == b"x" * 40
