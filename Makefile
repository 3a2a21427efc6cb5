# icldyn: two commands set everything up on a fresh machine with Python >= 3.11 and make.
#   make demo   create .venv, install, train the default demo, analyse and plot it
#   make test   create or update .venv, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/demo
PAPERDIR ?= runs/paper
JAX_EXTRA ?=

.PHONY: venv demo test test-slow bench profile paper paper-cpu paper-smoke clean

# The stamp depends on setup.cfg, so `make test` re-installs when dependencies change.
$(VENV)/.installed: setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' $(JAX_EXTRA)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m icldyn demo --workdir $(WORKDIR)

# -n auto: one pytest worker per core; most of a test's time is compiling, which
# runs on one core, so two workers nearly halve the suite on 2 cores. --dist
# loadfile keeps a file's module fixtures in one worker.
test: venv
	$(PY) -m pytest -q -n auto --dist loadfile tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

bench: venv
	$(PY) -m icldyn.bench

profile: venv
	$(PY) -m icldyn.bench_profile

paper: venv
	$(PY) -m icldyn paper --outdir $(PAPERDIR)

paper-cpu: venv
	$(PY) -m icldyn paper --outdir $(PAPERDIR)-cpu --variant cpu

paper-smoke: venv
	$(PY) -m icldyn paper --outdir $(PAPERDIR)-smoke --smoke

clean:
	rm -rf runs $(VENV)
