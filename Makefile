# Mesh: `make run` starts a local mesh, `make test` runs every test.
# Both set up what they need first (virtualenv, packages, generated code, etcd,
# grpcurl, redis-server, the Node.js example's packages).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
GEN    := generated/.stamp
PROTOS := $(shell find protos -name '*.proto')
NODE_EXAMPLE := clients/node/node_modules/.package-lock.json
# The buf CLI (proto lint), pinned in tools/buf/package-lock.json.
BUF_STAMP := tools/buf/node_modules/.package-lock.json
BUF := tools/buf/node_modules/.bin/buf

.PHONY: dist setup bytecode lock generate run test test-fast test-integration test-chaos bench partitions lint clean redis-server netns-tools chromium

setup: $(STAMP) $(GEN) $(NODE_EXAMPLE) $(BUF_STAMP) redis-server netns-tools chromium bytecode

# Compile the checkout's modules once. Where PYTHONDONTWRITEBYTECODE is set (as
# on the CI machines) nothing else writes .pyc files, so every node, coordinator
# and meshctl process a test starts would compile the whole tree again: a third
# of a second of CPU each, hundreds of times per `make test`. Python still reads
# .pyc files then, and recompiles any whose source changed since.
bytecode: $(STAMP) $(GEN)
	$(PY) -m compileall -q -j 0 clients common coordinator gateway meshctl nodes generated bench tests tools

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The project itself is not installed (installed, it is `meshkit.*`): its
	# dependencies are, and a .pth file puts the checkout and generated/ on sys.path.
	$(PY) -m pip uninstall --quiet --yes mesh 2>/dev/null || true
	$(PY) tools/checkout_env.py server etcd dev bench
	$(PY) tools/generate.py
	touch $(GEN) $@

$(GEN): $(PROTOS) tools/generate.py | $(STAMP)
	$(PY) tools/generate.py
	touch $@

# constraints.txt: the exact version of every Python package `make setup`
# installs, resolved afresh from pyproject.toml (all extras) at the newest
# releases. Run it to take upgrades, then `make test` and commit the file.
lock: $(STAMP)
	$(PY) -m uv pip compile pyproject.toml --all-extras --python-version 3.11 --upgrade \
	  --quiet --custom-compile-command "make lock" -o constraints.txt

generate: $(STAMP)
	$(PY) tools/generate.py
	touch $(GEN)

$(NODE_EXAMPLE): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error

$(BUF_STAMP): tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --no-audit --no-fund --loglevel=error

# Debian's redis-server, for the benchmark's baseline and the global rate limiter.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install Debian's redis-server package" >&2; exit 1; fi; }

# iproute2's ip and nftables: the multi-host tests put each process in its own
# network namespace and cut links with nftables rules (tests/hosts.py).
netns-tools:
	@command -v ip >/dev/null && command -v nft >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables >/dev/null; \
	  else echo "ip and nft are missing: install Debian's iproute2 and nftables packages" >&2; exit 1; fi; }

# Debian's Chromium, for the gateway's browser test (Playwright drives it; its own
# browser download is not reachable from the test machines).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is missing: install Debian's chromium package" >&2; exit 1; fi; }

run: setup
	$(PY) -m meshctl up --nodes 3

# Three workers on two cores, whole files each (module fixtures stay in one
# process), the costliest files first (SLOW_FIRST in tests/conftest.py): most
# tests wait on leases, failovers and timeouts, so a third worker fills the
# cores while the other two wait. Lint runs beside them in the time they leave
# idle (niced, so it never delays a lease); its output follows theirs.
test: setup
	@nice -n 10 $(MAKE) --no-print-directory lint >$(VENV)/lint.log 2>&1 & lint=$$!; \
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder; tests=$$?; \
	wait $$lint; linted=$$?; cat $(VENV)/lint.log; \
	[ $$linted = 0 ] || echo "make lint failed (above)" >&2; \
	[ $$tests = 0 ] && [ $$linted = 0 ]

# The lanes (tests/conftest.py puts each test in one): fast = unit and in-process
# tests only (no etcd, node or browser processes); integration = real processes;
# chaos = faults injected into real processes.
test-fast: setup
	$(PY) -m pytest -q -m fast

test-integration: setup
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m integration

test-chaos: setup
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m chaos

bench: setup
	$(PY) -m bench

# The partition table: tests/test_partitions.py run RUNS times (root: namespaces).
RUNS ?= 5
partitions: setup
	$(PY) -m bench.partitions --runs $(RUNS) --output bench/partitions.json

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BUF) lint

# The sdist and the wheel of `meshkit` (setup.py generates the protobuf code and
# rewrites the imports into the `meshkit` package): dist/*.tar.gz, dist/*.whl.
dist: $(STAMP)
	rm -rf dist build
	$(PY) -m build --outdir dist .

clean:
	rm -rf dist build $(VENV) generated clients/node/node_modules tools/buf/node_modules .pytest_cache .mypy_cache .ruff_cache
