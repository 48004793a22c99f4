"""The Pool and BatchSandbox reconcilers and the `opensandbox-controller` program."""
