# The two Quick start commands (README.md) and the checks CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint check bench bench-peers test-tools redis-server

# A venv with the project and its dev tools, rebuilt when pyproject.toml changes.
# Debian's python3 has no ensurepip, so no `python3 -m venv`, until python3-venv is
# installed: the recipe installs it when run as root and says the command otherwise.
$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is required (found $$($(PY) --version))" >&2; exit 1; }
	@$(PY) -c 'import venv, ensurepip' >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing python3-venv ($(PY) -m venv needs it)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
		else \
			echo "python3-venv is missing ($(PY) -m venv needs it): run 'sudo apt-get install -y python3-venv'" >&2; \
			exit 1; \
		fi; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stem demo

test: $(STAMP) test-tools
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

bench: $(STAMP) redis-server
	$(BIN)/python bench/drain.py --store sqlite
	$(BIN)/python bench/drain.py --store redis

# The whole comparison in one run: the peers (Huey, Dramatiq, Celery, RQ) and this
# project on both stores, interleaved, medians of REPS; figures as ratios in the JSON.
# BASE_VENV=/path/to/.venv adds a second build of this project (before/after a change).
# The shared harness beside the checkout; SHARED_BENCH=/path for a checkout elsewhere.
SHARED_BENCH ?= ../shared/bench
PEERS_VENV ?= $(or $(TMPDIR),/tmp)/peers-venv
PEERS ?= huey-sqlite,huey-redis,dramatiq-p2t8,celery,stem-sqlite,stem-redis
REPS ?= 2
bench-peers: $(STAMP) redis-server
	PEERS_VENV=$(PEERS_VENV) bash $(SHARED_BENCH)/setup_peers.sh
	mkdir -p bench/results
	STEM_VENV=$(CURDIR)/.venv STEM_SHARED_BENCH=$(abspath $(SHARED_BENCH)) $(if $(BASE_VENV),STEM_BASE_VENV=$(BASE_VENV)) \
	    $(PEERS_VENV)/bin/python $(if $(BASE_VENV),bench/peers_ab.py,$(SHARED_BENCH)/peers.py) \
	    --peers $(if $(BASE_VENV),huey-redis$(COMMA)base-sqlite$(COMMA)stem-sqlite$(COMMA)base-redis$(COMMA)stem-redis,$(PEERS)) \
	    --n 20000 --reps $(REPS) --out bench/results/peers-$$(date +%F-%H%M).json
COMMA := ,

# The tests need real programs from Debian packages (PROGRAM:PACKAGE): a private
# redis-server, shellcheck for install.sh, systemd-analyze for the units. They fail,
# never skip, without them, so these recipes install what is missing when run as root
# and say the command otherwise.
TEST_TOOLS := redis-server:redis-server shellcheck:shellcheck systemd-analyze:systemd

# $(call need,PROGRAM:PACKAGE ...)
need = @missing=""; \
	for tool in $(1); do \
		command -v "$${tool%%:*}" >/dev/null 2>&1 || missing="$$missing $${tool\#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "missing:$$missing; run 'sudo apt-get install -y$$missing'" >&2; exit 1; \
		fi; \
	fi

test-tools:
	$(call need,$(TEST_TOOLS))

redis-server:
	$(call need,redis-server:redis-server)
