# icldyn: two commands set everything up on a fresh machine with Python >= 3.11 and make.
#   make demo   create .venv, install, train the default demo, analyse and plot it
#   make test   create or update .venv, run the test suite (on CPU, whatever the machine has)
# On a GPU or TPU machine: make venv ACCEL=cuda12 (or cuda13, tpu), then make gpu-check.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/demo
PAPERDIR ?= runs/paper
# The JAX build: cpu, cuda12 (NVIDIA, CUDA 12 wheels), cuda13, tpu. `make venv
# ACCEL=...` installs it and remembers it in $(VENV)/.accel for later targets.
ACCELS := cpu cuda12 cuda13 tpu
ACCEL  ?= $(shell cat $(VENV)/.accel 2>/dev/null || echo cpu)
STAMP  := $(VENV)/.installed-$(ACCEL)
# Accelerator packages of the JAX builds, removed when another build is chosen.
PLUGINS := jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt libtpu
comma  := ,
GPU_CHECK_ARGS ?=

.PHONY: venv demo test test-slow gpu-check bench profile paper paper-cpu paper-smoke clean

# The stamp depends on setup.cfg and the build, so `make test` re-installs when
# dependencies change and `make venv ACCEL=cuda12` installs even when .venv exists.
# The accelerator build is setup.cfg's extra of that name (jax[cuda12] etc.,
# inside icldyn's jax pins).
$(STAMP): setup.cfg setup.py
	@case " $(ACCELS) " in *" $(ACCEL) "*) ;; \
	  *) echo "make: ACCEL must be one of: $(ACCELS) (got '$(ACCEL)')" >&2; exit 2;; esac
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q --upgrade pip
	-$(PY) -m pip uninstall -q -y $(PLUGINS) 2>/dev/null
	$(PY) -m pip install -q -e '.[test$(if $(filter-out cpu,$(ACCEL)),$(comma)$(ACCEL))]'
	echo $(ACCEL) > $(VENV)/.accel
	@echo "make venv: installed the $(ACCEL) build of JAX:"
	@$(PY) -m pip list --format=freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|libtpu|flax|nvidia-cuda-runtime-cu[0-9]+)==' | sed 's/^/  /'
	touch $@

venv: $(STAMP)

demo: venv
	$(PY) -m icldyn demo --workdir $(WORKDIR)

# -n auto: one pytest worker per core; most of a test's time is compiling, which
# runs on one core, so two workers nearly halve the suite on 2 cores. --dist
# loadfile keeps a file's module fixtures in one worker. JAX_PLATFORMS=cpu: the
# tests are CPU tests (their tolerances and fake devices are), and on a GPU
# machine each worker would reserve most of the GPU's memory.
test: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n auto --dist loadfile tests

test-slow: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow tests

# On a machine with a GPU or TPU (README: Installing for accelerators): the
# checks of issue 21 in one table, at most 8 minutes. GPU_CHECK_ARGS=--cpu
# runs them on CPU.
gpu-check: venv
	$(PY) -m icldyn.gpu_check $(GPU_CHECK_ARGS)

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
