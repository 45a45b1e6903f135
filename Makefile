# The README's two commands: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3

.PHONY: setup demo test

setup:
	@bash .ci/setup

demo: setup
	bpfilter demo

test: setup
	$(PYTHON) -m pytest -q
