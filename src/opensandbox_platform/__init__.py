"""OpenSandbox platform: controller, server, execd and task-executor in one distribution."""

__version__ = "0.1.0"
