# The two set-up commands are `make run` and `make test`; see README.md.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
UV := uv
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: help run test lint format crds cluster-up cluster-down node-up node-down podman-up podman-down bench tools execd-binary execd-image task-executor-binary docker-build-task-executor docker-build-egress docker-build docker-build-server docker-build-execd code-interpreter-image

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run:  ## install what is needed and start the server on $(HOST):$(PORT)
	tools/setup.sh run
	$(UV) run opensandbox-server --host $(HOST) --port $(PORT)

test:  ## the whole suite, its cluster and host parts at once (tools/test.sh); starts the services it needs and stops them
	tools/setup.sh test
	tools/build-execd.sh --check
	tools/build-task-executor.sh --check
	UV=$(UV) tools/test.sh $(PYTEST_ARGS)

lint:  ## ruff and mypy
	tools/setup.sh run
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format:  ## apply ruff's formatting and fixes
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

crds:  ## regenerate config/crds.yaml and the chart's copy from the models in api/crds.py
	$(UV) run opensandbox-controller print-crds > config/crds.yaml
	cp config/crds.yaml charts/opensandbox-controller/files/crds.yaml

execd-binary:  ## build the self-contained execd: build/execd/opensandbox/ (PyInstaller one-dir + bootstrap.sh)
	tools/setup.sh run
	tools/build-execd.sh --check

execd-image:  ## the execd image localhost/opensandbox/execd:dev (what the tests use; podman)
	tools/setup.sh run
	tools/build-image.sh execd localhost/opensandbox/execd:dev

TASK_EXECUTOR_IMG ?= opensandbox/task-executor:dev
task-executor-binary:  ## build the self-contained task-executor: build/task-executor/opensandbox-task-executor/ (one-dir)
	tools/setup.sh run
	tools/build-task-executor.sh --check

docker-build-task-executor:  ## the task-executor image $(TASK_EXECUTOR_IMG) (podman; tools/build-image.sh)
	tools/setup.sh run
	tools/build-image.sh task-executor $(TASK_EXECUTOR_IMG)

EGRESS_IMG ?= opensandbox/egress:dev
docker-build-egress:  ## the egress sidecar image $(EGRESS_IMG) (network policies; podman; tools/build-image.sh)
	tools/setup.sh run
	tools/build-image.sh egress $(EGRESS_IMG)

IMG ?= opensandbox/controller:dev
SERVER_IMG ?= opensandbox/server:v0.1.0
EXECD_IMG ?= opensandbox/execd:v1.0.5
docker-build:  ## the controller image $(IMG): PyInstaller build FROM scratch (podman; tools/build-image.sh)
	tools/setup.sh run
	tools/build-image.sh controller $(IMG)

docker-build-server:  ## the server image $(SERVER_IMG), built like the controller's
	tools/setup.sh run
	tools/build-image.sh server $(SERVER_IMG)

docker-build-execd:  ## the execd image $(EXECD_IMG) (the chart's default execdImage)
	tools/setup.sh run
	tools/build-image.sh execd $(EXECD_IMG)

CODE_INTERPRETER_IMG ?= opensandbox/code-interpreter:dev
code-interpreter-image:  ## the code-interpreter image $(CODE_INTERPRETER_IMG): Debian Python, ipykernel, numpy, pandas, matplotlib, bash and JavaScript/TypeScript kernels
	tools/setup.sh test
	tools/build-image.sh code-interpreter $(CODE_INTERPRETER_IMG)

tools:  ## build the test cluster's binaries (cached in ~/.cache/opensandbox-dev)
	tools/setup.sh cluster

cluster-up: tools  ## start the local control plane and kwok nodes; then `source .cluster/env`
	tools/cluster.sh up

cluster-down:  ## stop the local cluster and remove its state
	tools/cluster.sh down

node-up:  ## start the real node (kubelet + containerd) in the running cluster; see docs/test-cluster.md
	tools/node.sh up

node-down:  ## stop the real node, its pods, bridge and mounts
	tools/node.sh down

podman-up:  ## start podman's Docker API service and build the test image; then `source .podman/env`
	tools/podman.sh up

podman-down:  ## stop podman's Docker API service
	tools/podman.sh down

bench:  ## run the benchmarks; figures are printed and written to bench/results/
	tools/setup.sh test
	$(UV) run python -m bench $(BENCH)
