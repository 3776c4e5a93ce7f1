# Two entry points (see README.md): `make demo` and `make test`. Both build .venv first.
PY := .venv/bin/python
TORCH := torch==2.13.0

.venv/.installed: setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: .venv/.installed

demo: .venv/.installed
	$(PY) scripts/demo.py

test: .venv/.installed
	$(PY) -m pytest -q tests

.PHONY: venv demo test
