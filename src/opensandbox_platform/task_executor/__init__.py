"""The task-executor sidecar that runs BatchSandbox tasks on port 5758."""
