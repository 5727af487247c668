# The two commands a new user needs: `make demo` and `make test`.
# Both run scripts/setup.sh first (idempotent: packages, CRIU 4.2.1, venv).

VENV   ?= .venv
PY     := $(VENV)/bin/python
TUG    := $(VENV)/bin/tug
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test unit e2e typecheck bench-quick bench-full lab-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# Three lanes at once, each in its own lab instance: see scripts/test.sh.
test: setup typecheck
	@bash scripts/test.sh

unit: setup
	$(PYTEST) -q tests/unit

e2e: setup
	$(PYTEST) -q -ra tests/e2e

# mypy cannot see through the editable install's import hook, so give it a
# tree where tug.engine etc. resolve to the source folders.
typecheck: setup
	@mkdir -p build/mypy/tug
	@for p in engine transports policies; do ln -sfn ../../../$$p build/mypy/tug/$$p; done
	cd build/mypy && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p tug.engine -p tug.transports -p tug.policies

bench-quick: setup
	$(PY) -m bench quick

bench-full: setup
	$(PY) -m bench full

lab-down:
	$(TUG) lab down

clean:
	rm -rf build .mypy_cache .pytest_cache
