# udsgateway: `make run` starts the gateway, `make test` runs the whole suite.
# Both set everything up on a fresh machine first (virtualenv, install).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= etc/udsgateway.toml

# The hot path compiled with mypyc (setup.py; the list is in src/udsgateway/compiled.py).
# The editable install builds the extensions beside their sources; when one of those
# sources changes, they are built again before anything runs.
COMPILED_SOURCES := $(shell sed -n 's/^    "udsgateway\.\(.*\)",$$/src\/udsgateway\/\1.py/p' \
	src/udsgateway/compiled.py | tr . /  | sed 's/\/py$$/.py/')
EXT_STAMP := $(VENV)/.compiled-stamp

# The pure-Python variant (UDSGATEWAY_PURE=1: nothing compiled), for the second test run:
# its own virtualenv, installed in editable mode from a copy of src/ without extensions.
PURE_VENV ?= .venv-pure
PURE_BIN := $(PURE_VENV)/bin
PURE_TREE := build/pure
PURE_STAMP := $(PURE_VENV)/.installed-stamp
# The pure run: the unit tests of the compiled modules and of their callers, the
# variant check, and the integration smoke (a real gateway process and the demo flows).
PURE_TESTS ?= tests.test_compiled tests.test_framing tests.test_header tests.test_ack \
	tests.test_batch tests.test_message tests.test_framed tests.test_listener \
	tests.test_application_ack tests.test_templating tests.test_lookups tests.test_catalogue \
	tests.test_operations.SearchKeysTests tests.test_delivery tests.test_executor \
	tests.test_listener_fuzz tests.integration.test_gateway_process \
	tests.integration.test_flows_e2e.FlowsEndToEndTests

# Node peers for the integration tests (git-ignored): @medplum/hl7's client.
NODE_PEERS := tests/peers/node
NODE_STAMP := $(NODE_PEERS)/.installed-stamp
MEDPLUM_HL7 ?= @medplum/hl7@5.0.10

.PHONY: run test install trial trial-pure pure-tree lint typecheck bench bench-smoke clean \
	node-peers chromium haproxy cluster

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1" "setuptools>=68" wheel
	# compat mode puts src/ on sys.path, so twistd finds src/twisted/plugins too
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP) $(EXT_STAMP)

# A compiled module's source changed, or the list of them (compiled.py): build the
# extensions again (the venv has mypyc).
$(EXT_STAMP): $(STAMP) $(COMPILED_SOURCES) src/udsgateway/compiled.py setup.py
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . \
		--config-settings editable_mode=compat
	touch $(EXT_STAMP)

install: $(STAMP) $(EXT_STAMP)

pure-tree:
	mkdir -p $(PURE_TREE)
	$(PYTHON) -c "import shutil; shutil.copytree('src', '$(PURE_TREE)/src', \
		dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.so', '__pycache__', \
		'*.egg-info', 'compiled-sources.json', 'dropin.cache'))"
	cp setup.py setup.cfg pyproject.toml README.md $(PURE_TREE)/

$(PURE_STAMP): setup.py setup.cfg pyproject.toml
	test -x $(PURE_BIN)/python || $(PYTHON) -m venv $(PURE_VENV)
	$(PURE_BIN)/python -m pip install --quiet --upgrade "pip>=23.1" "setuptools>=68" wheel
	$(MAKE) pure-tree
	UDSGATEWAY_PURE=1 $(PURE_BIN)/python -m pip install --quiet -e '$(PURE_TREE)[dev]' \
		--config-settings editable_mode=compat
	touch $(PURE_STAMP)

# Installs node and npm with apt-get when absent, then the pinned npm packages.
$(NODE_STAMP): Makefile
	@command -v npm >/dev/null 2>&1 || { \
		echo "node-peers: installing nodejs and npm with apt-get"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@npm install --prefix $(NODE_PEERS) --save-exact --no-audit --no-fund \
		--loglevel=error $(MEDPLUM_HL7) >/dev/null
	@touch $@

node-peers: $(NODE_STAMP)

# The console's browser tests drive Debian's Chromium (Playwright for Python,
# never a browser download): installed with apt-get when absent.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@echo "chromium: installing Debian's chromium with apt-get"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

chromium: $(CHROMIUM)

# HAProxy in front of the gateway (the PROXY-protocol tests, `make cluster`): Debian's
# haproxy, installed with apt-get when absent (its packaged service is not used).
HAPROXY ?= /usr/sbin/haproxy
$(HAPROXY):
	@echo "haproxy: installing Debian's haproxy with apt-get"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null

haproxy: $(HAPROXY)

# Three gateway nodes in cluster mode on the local PostgreSQL behind HAProxy, until
# Ctrl-C (docs/cluster.md, "Run a cluster on one machine"). Generated files and logs
# in var/cluster; options after CLUSTER_ARGS, e.g. CLUSTER_ARGS="--fresh --nodes 2".
CLUSTER_ARGS ?=
cluster: install $(HAPROXY)
	$(BIN)/python -m udsgateway.testing.cluster $(CLUSTER_ARGS)

run: install
	mkdir -p var
	@# First run: a demo admin user for the admin API, its password printed once.
	$(BIN)/udsgateway --config $(CONFIG) users add demo --role admin --view-content \
		--generate-password --if-missing --who "make run"
	$(BIN)/twistd --nodaemon --pidfile= udsgateway --config $(CONFIG)

# Trial runs its tests in JOBS worker processes. Each Python process started
# under the run (trial's workers, the gateways of the integration tests) records
# coverage through coverage's .pth hook (COVERAGE_PROCESS_START), into one data
# file per process here (COVERAGE_FILE, absolute: the workers run in
# _trial_temp/N); combine merges them. The report leaves out the copy of the
# package that the wheel-install test installs under _trial_temp. A log file
# over 5 MB fails the run: a repr or a loop flooding the log (it once wrote 331 MB).
JOBS ?= 2
trial: install $(NODE_STAMP) $(CHROMIUM) $(HAPROXY)
	rm -f .coverage .coverage.*
	UDSGATEWAY_EXPECT_VARIANT=compiled \
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml COVERAGE_FILE=$(CURDIR)/.coverage \
		$(BIN)/coverage run -m twisted.trial --jobs=$(JOBS) --temp-directory=_trial_temp tests
	$(BIN)/coverage combine --quiet || true
	$(BIN)/coverage report --fail-under=0 --omit='*/_trial_temp/*' | tail -n 3
	@big="$$(find _trial_temp -name '*.log' -size +5M)"; \
		if [ -n "$$big" ]; then echo "log files over 5 MB: $$big"; exit 1; fi

# The same tests on the pure-Python build (src/ copied afresh first, so it is current).
trial-pure: $(PURE_STAMP) $(NODE_STAMP) pure-tree
	UDSGATEWAY_EXPECT_VARIANT=pure $(PURE_BIN)/python -m twisted.trial --jobs=$(JOBS) \
		--temp-directory=_trial_temp_pure $(PURE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: trial trial-pure lint typecheck

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(PURE_VENV) $(NODE_PEERS) _trial_temp* .coverage .coverage.* build \
		*.egg-info src/*.egg-info src/*.so src/udsgateway/compiled-sources.json
	find src -name '*.so' -delete
