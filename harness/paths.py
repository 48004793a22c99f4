"""Where things are in this tree, and the tool cache the test cluster's binaries are built into."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
CRDS = ROOT / "config" / "crds.yaml"  # generated from api/crds.py (`make crds`)
# tools/build-execd.sh (make execd-binary): what sandboxes get at /opt/opensandbox (execd, execd-lib/,
# bootstrap.sh), and the executable in it.
EXECD_DIR = ROOT / "build" / "execd" / "opensandbox"
EXECD_BINARY = EXECD_DIR / "execd"
DOCKER_SOCKET = ROOT / ".podman" / "docker.sock"  # podman's Docker API (tools/podman.sh)


def cache_dir() -> Path:
    """The tool cache (tools/build-tools.sh): $OSB_CACHE, by default ~/.cache/opensandbox-dev."""
    return Path(os.environ.get("OSB_CACHE", Path.home() / ".cache" / "opensandbox-dev"))


def sandbox_token_key() -> Path:
    """The key the tests' controllers and servers derive sandbox pods' tokens from (created once)."""
    path = cache_dir() / "sandbox-token.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    return path


# tools/build-task-executor.sh: the one-dir build's executable.
TASK_EXECUTOR_BINARY = ROOT / "build" / "task-executor" / "opensandbox-task-executor" / "opensandbox-task-executor"
