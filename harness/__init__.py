"""The test harness: what the tests and the benchmarks share to start the programs and services they run
against (the local cluster, podman's Docker API, the real node, images, and `opensandbox-controller`,
`opensandbox-server` and execd as subprocesses), with the constants and helpers that go with them.

`tests/` (whose pytest fixtures wrap it) and `bench/` import it; product code (`src/`) never does, and
it is not part of the wheel.
"""
