# Two commands do everything on a fresh machine:
#   make run    set up .venv and run the main job (HINT-SD on BFCL with the embedded model)
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
BFCL := bfcl-eval==2026.3.23

.PHONY: setup run test bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(BFCL)
	touch $@

run: setup
	$(PY) hintsd.py --bench bfcl

# pytest exits 5 when it collects no test; that is a failure here too, so CI never passes empty.
test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/generate.py
