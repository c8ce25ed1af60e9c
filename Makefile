# Two entry points for a newcomer: `make demo` and `make test`. Both build
# their own virtual environment first (.venv, reused while pyproject.toml is unchanged).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,analysts]'
	touch $@

demo: $(VENV)/.installed
	scripts/in-netns.sh scripts/demo.sh $(DEMO_ARGS)

test: $(VENV)/.installed
	scripts/system-deps.sh
	scripts/in-netns.sh $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	scripts/in-netns.sh $(PY) bench/core_throughput.py

clean-venv:
	rm -rf $(VENV)
