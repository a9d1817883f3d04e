# `make test` works on a fresh Debian machine as root: it installs the
# system packages, makes .venv, installs umgr into it and runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# liburing-dev builds umgr; the rest are programs the tests run under umgr.
APT_PACKAGES := liburing-dev gcc make python3-dev python3 xz-utils time gawk libjemalloc-dev

.PHONY: deps venv build test bench clean

deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

venv: deps $(BIN)/python

build: venv
	$(BIN)/pip install -q -e '.[test]'

test: build
	$(BIN)/python -m pytest tests

bench: build
	$(BIN)/python -m umgr bench

clean:
	rm -rf $(VENV) build *.egg-info bindings/*.so bindings/_*.c bindings/_*.o
