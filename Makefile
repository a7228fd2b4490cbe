# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck unit bench bench-waiters broker broker-stop kafka-jars install clean

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

## The test command: lint, types, then every test against a real broker.
test: check broker
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

## The demo: a real broker, the topics, the orchestrator, the services, sagas.
demo: broker
	$(BIN)/python -m services_example.demo

bench: broker
	$(BIN)/python -m bench.sagas --bootstrap "$$($(BIN)/python -m deploy.kafka.broker bootstrap)"

bench-waiters: broker
	$(BIN)/python -m bench.waiters --bootstrap "$$($(BIN)/python -m deploy.kafka.broker bootstrap)"

clean: broker-stop
	rm -rf .run
