# `make test` works on a fresh Debian machine as root: it installs the system
# packages, builds the sdist and, from it, the wheel, installs the wheel into
# a fresh venv outside the checkout, checks that the installed commands start,
# and runs the suite against that installed package (not the source tree: an
# editable install once hid a subpackage missing from the wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_VENV ?= $(or $(TMPDIR),/tmp)/umgr-test-venv
TBIN := $(TEST_VENV)/bin
WHEEL = $(firstword $(wildcard dist/umgr-*.whl))
# liburing-dev, liblz4-dev and libzstd-dev build umgr (io_uring; the compressed
# store's codecs, which the fast path unpacks with too); the rest are programs the tests run under umgr,
# Prometheus (with promtool), which the metrics tests scrape with, and
# redis-server/redis-tools for the local Redis Cluster of the redis backend's tests,
# systemd-analyze and groff, which check the unit file and the man page; a JDK for
# the JVM workload (a test and bench/programs/JvmHeap.java); git for tools/ab.py, which a test runs.
APT_PACKAGES := git liburing-dev liblz4-dev libzstd-dev gcc make python3-dev python3 python3-venv xz-utils time gawk libjemalloc-dev prometheus strace \
	redis-server redis-tools systemd groff-base openjdk-17-jdk-headless

.PHONY: deps venv dist build dev test smoke bench clean

deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip build

venv: deps $(BIN)/python

# The sdist, and the wheel built from it (so the sdist is proven complete).
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist . >dist.log 2>&1 || { tail -40 dist.log; exit 1; }

# The README's install: the wheel, as a user gets it, into .venv.
build: dist
	$(BIN)/pip install -q "$(WHEEL)[test]"
	$(BIN)/pip install -q --force-reinstall --no-deps "$(WHEEL)"

# For working on umgr: an editable install into .venv.
dev: venv
	$(BIN)/pip install -q -e '.[test]'

test: dist
	rm -rf $(TEST_VENV)
	$(PY) -m venv $(TEST_VENV)
	$(TBIN)/pip install -q --upgrade pip
	$(TBIN)/pip install -q "$(WHEEL)[test]"
	$(MAKE) --no-print-directory smoke
	cd $(TEST_VENV) && UMGR_TEST_INSTALLED=1 $(TBIN)/python -m pytest -p no:cacheprovider --durations=25 $(CURDIR)/tests

# The installed commands start and page, run from outside the checkout.
smoke:
	cd $(TEST_VENV) && $(TBIN)/umgr --help >/dev/null
	cd $(TEST_VENV) && $(TBIN)/umgr doctor
	cmp deploy/umgr.service $(TEST_VENV)/share/umgr/umgr.service
	# (the README's install of the unit: ExecStart= made the venv's umgr)
	sed "s|^ExecStart=/usr/local/bin/umgr|ExecStart=$(TBIN)/umgr|" $(TEST_VENV)/share/umgr/umgr.service \
		| grep -qx "ExecStart=$(TBIN)/umgr daemon" && test -x $(TBIN)/umgr
	cd $(TEST_VENV) && $(TBIN)/umgr manpage | groff -man -ww -z
	cd $(TEST_VENV) && $(TBIN)/umgr bench io --seconds 0.2 --size-mib 16 >/dev/null
	cd $(TEST_VENV) && $(TBIN)/umgr exec --max-resident 8M --swap-size 256M -- \
		$(TBIN)/python -c "x = bytearray(64 << 20); x[::4096] = b'x' * (len(x) // 4096); assert x.count(b'x') == 16384"

bench: dev
	$(BIN)/python -m umgr bench

clean:
	rm -rf $(VENV) build dist dist.log *.egg-info bindings/*.so bindings/_*.c bindings/_*.o
