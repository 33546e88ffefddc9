# Two commands do everything on a fresh machine:
#   make run    set up .venv and run the main job (HINT-SD on BFCL; on a CPU with the embedded model)
#   make test   set up .venv (and .venv-appworld for the AppWorld engine tests) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
BFCL := bfcl-eval==2026.3.23
# the exact versions `make` installs (requirements.txt holds ranges); `make setup PINS=` keeps what a venv has
PINS ?= torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 gguf==0.19.0 accelerate==1.15.0
APPWORLD_VENV ?= .venv-appworld
APPWORLD := appworld==0.1.3.post1

.PHONY: setup run test bench setup-appworld
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(PINS)
	$(PY) -m pip install -q --no-deps $(BFCL)
	touch $@

# each `make run` is a new run dir (a run never writes into another's: hintsd.py refuses a non-empty --out)
run: setup
	$(PY) hintsd.py --bench bfcl --out runs/hintsd-$$(date +%Y%m%d-%H%M%S)

# pytest exits 5 when it collects no test; that is a failure here too (with a message), so CI never passes empty.
test: setup setup-appworld
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; fi; exit $$rc

bench: setup
	$(PY) bench/generate.py

# AppWorld in its own venv (it pins pydantic<2); envs.py drives it through a worker process.
# `appworld install` unpacks its encrypted app code inside that venv (never commit it). Real task data,
# with internet: $(APPWORLD_VENV)/bin/appworld download data --root .appworld_root
setup-appworld: $(APPWORLD_VENV)/.installed

$(APPWORLD_VENV)/.installed:
	python3 -m venv $(APPWORLD_VENV)
	$(APPWORLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(APPWORLD_VENV)/bin/python -m pip install -q $(APPWORLD)
	$(APPWORLD_VENV)/bin/appworld install
	touch $@
