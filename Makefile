# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: help run test check lint typecheck buf proto bench fuzz migrate migrate-status \
	migrate-rollback kubernetes system-deps clean

help:
	@echo "make run               the whole stack in the foreground (Ctrl-C stops it)"
	@echo "make test              lint, import layers, type checks, contract checks and the whole test suite"
	@echo "make bench             benchmarks (prints numbers); AGAINST=<commit> compares hot paths"
	@echo "make fuzz [SEED=n]     schemathesis against the gateway, long run, random seed"
	@echo "make proto             regenerate Python code and the gateway descriptor set"
	@echo "make kubernetes        re-render deploy/kubernetes/'s generated files (gateway config, alert rules)"
	@echo "make migrate | migrate-status | migrate-rollback"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

system-deps:
	@deploy/system-deps.sh

run: $(STAMP) system-deps
	$(PY) -m deploy.devstack.stack

# Workers in parallel, each with its own PostgreSQL, Redis and services (tests/conftest.py);
# TEST_WORKERS=1 runs the suite in one process. Three on this 2-core machine: about a third of
# the suite waits on real servers (timeouts, failovers, alerts, flush intervals), and a third
# worker fills the core two would leave idle then; more only make each request wait longer for
# a core (the gateway's 0.5 s key check and the services' request budgets would then time out
# under the suite's own load).
# schemathesis's pytest plugin is not used (tests/e2e/test_fuzz.py runs its command): not
# loading it saves each worker most of a second of CPU.
# The suite starts a few hundred Python processes (services, migrations, `make run`): they
# keep their compiled modules (__pycache__, ignored by git) even where the environment says
# not to (PYTHONDONTWRITEBYTECODE), instead of each compiling the project anew.
# The static checks (`make check`) run beside the suite, their output printed after it:
# either failing fails `make test`.
TEST_WORKERS ?= 3
test: $(STAMP) system-deps
	@checks=$$(mktemp); \
	$(MAKE) --no-print-directory check > $$checks 2>&1 & checking=$$!; \
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q cert_service key_service shared deploy protos; \
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -q -p no:cacheprovider -p no:schemathesis \
	  -n $(TEST_WORKERS) --dist worksteal; tested=$$?; \
	wait $$checking; checked=$$?; \
	echo "--- make check"; cat $$checks; rm -f $$checks; \
	if [ $$checked -ne 0 ]; then echo "make check failed"; fi; \
	exit $$(( tested || checked ))

check: lint typecheck buf

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

buf: $(STAMP)
	$(BIN)/buf lint
	@if git rev-parse --verify -q HEAD~1 >/dev/null && \
	    git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
	  echo "buf breaking --against HEAD~1"; \
	  $(BIN)/buf breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no previous commit with contracts, skipped"; fi

proto: $(STAMP)
	$(PY) protos/generate.py
	$(PY) -m deploy.kubernetes.render

# After changing deploy/envoy/ or deploy/prometheus/alerts.yml (make test fails until then).
kubernetes: $(STAMP)
	$(PY) -m deploy.kubernetes.render

# AGAINST=<commit>: the gateway and verify benchmarks for this tree and that commit, side by
# side in one run, with their ratios (tests/bench/compare.py).
bench: $(STAMP)
	@deploy/system-deps.sh bench
	@if [ -n "$(AGAINST)" ]; then $(PY) -m tests.bench.compare --against "$(AGAINST)"; \
	else $(PY) -m tests.bench; fi

# The schemathesis test of `make test`, longer: more examples, the stateful phase, a random
# seed (or SEED=n to repeat a run). Prints the seed, the cases run and where requests ended.
fuzz: $(STAMP) system-deps
	MYL_FUZZ_RANDOM=1 MYL_FUZZ_SEED=$(SEED) MYL_FUZZ_EXAMPLES=$${MYL_FUZZ_EXAMPLES:-200} \
	MYL_FUZZ_PHASES=examples,coverage,fuzzing,stateful \
	$(BIN)/pytest -q -s -p no:cacheprovider tests/e2e/test_fuzz.py

migrate: $(STAMP)
	$(PY) -m cert_service migrate up
	$(PY) -m key_service migrate up

migrate-status: $(STAMP)
	$(PY) -m cert_service migrate status
	$(PY) -m key_service migrate status

# Asks for confirmation; ARGS="--yes" (and --force, --discard-data) for scripts.
migrate-rollback: $(STAMP)
	$(PY) -m key_service migrate down $(ARGS)
	$(PY) -m cert_service migrate down $(ARGS)

clean:
	rm -rf .run .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache
