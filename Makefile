# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck unit bench broker broker-stop kafka-jars browser install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

kafka-jars: install
	$(BIN)/python -m deploy.kafka.broker jars

broker: kafka-jars
	$(BIN)/python -m deploy.kafka.broker start

broker-stop: install
	$(BIN)/python -m deploy.kafka.broker stop

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck

## Debian's Chromium, for the console's browser test (tests/integration/test_console.py; Playwright
## drives it, no browser download). Installed when missing, with sudo unless root; if that fails
## the test is skipped and says why.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@test -x $(CHROMIUM) || { echo "make browser: installing Debian's chromium"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; } || \
	  echo "make browser: could not install Debian's chromium; the console's browser test will be skipped"

## The test command: lint, types, then every test against a real broker.
test: check broker browser
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

## The demo: a real broker, the topics, the orchestrator, the services, sagas.
demo: broker
	$(BIN)/python -m services_example.demo

bench: broker
	$(BIN)/python -m bench.sagas --bootstrap "$$($(BIN)/python -m deploy.kafka.broker bootstrap)"

clean: broker-stop
	rm -rf .run
