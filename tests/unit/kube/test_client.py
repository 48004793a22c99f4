"""The one private part of lightkube we rely on: its exec-plugin auth's cached token."""

from __future__ import annotations

from lightkube.config.client_adapter import ExecAuth
from lightkube.config.models import UserExec

from opensandbox_platform.kube.client import forget_cached_token


def test_an_exec_plugins_cached_token_can_be_forgotten() -> None:
    auth = ExecAuth(UserExec(apiVersion="client.authentication.k8s.io/v1", command="true"))
    auth._last_bearer = "Bearer old"  # what lightkube keeps after running the plugin
    forget_cached_token(auth)
    assert auth._last_bearer is None, "lightkube renamed its cache: kube/client.py must follow"
    assert "_last_bearer" in vars(ExecAuth(UserExec(apiVersion="v1", command="true")))
