# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck unit bench bench-waiters broker broker-stop kafka-jars browser install clean helm

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

## helm, for the chart's lint/template test (tests/deploy/test_helm.py): built from source through
## the Go module proxy, since the release tarballs' host is not reachable from every build machine
## (2 to 7 minutes on 2 cores the first time, seconds once cached). When it cannot be built, the reason is
## written to $(TOOLS)/helm.unavailable, `make test` goes on and that test skips, quoting it.
HELM_VERSION := v3.22.0
# The Kubernetes version helm's own Makefile stamps in: from the client-go it builds with (v0.37).
HELM_K8S_MINOR := 37
TOOLS := .run/tools
GO ?= $(shell command -v go || ls /usr/local/go/bin/go 2>/dev/null)
HELM_LDFLAGS := -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
	$(foreach pkg,pkg/lint/rules pkg/chartutil,\
	-X helm.sh/helm/v3/$(pkg).k8sVersionMajor=1 -X helm.sh/helm/v3/$(pkg).k8sVersionMinor=$(HELM_K8S_MINOR))

# The stamp names the version, so that a new HELM_VERSION rebuilds; a failed build leaves none
# and is tried again by the next `make test`.
helm: $(TOOLS)/.helm-$(HELM_VERSION)

$(TOOLS)/.helm-$(HELM_VERSION):
	@mkdir -p $(TOOLS)
	@rm -f $(TOOLS)/helm.unavailable
	@if [ -z "$(GO)" ]; then \
		echo "helm $(HELM_VERSION) not built: no Go toolchain (go on PATH or /usr/local/go/bin/go)" \
			| tee $(TOOLS)/helm.unavailable; \
	else \
		echo "building helm $(HELM_VERSION) from the Go module proxy (go install)"; \
		GOBIN="$(abspath $(TOOLS))" GOFLAGS=-modcacherw "$(GO)" install -ldflags "$(HELM_LDFLAGS)" \
			helm.sh/helm/v3/cmd/helm@$(HELM_VERSION) 2> $(TOOLS)/helm.build.log \
		&& touch $@ \
		|| { echo "helm $(HELM_VERSION) not built: go install failed: $$(tail -n 3 $(TOOLS)/helm.build.log | tr '\n' ' ')" \
			| tee $(TOOLS)/helm.unavailable; }; \
	fi

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
test: check broker browser helm
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
