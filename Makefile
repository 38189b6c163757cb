# `make run` and `make test` each set up .venv on first use (uv, or pip), then do their job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test ui clean
install: $(VENV)/.installed

# uv does not read pip's config, so the machine's find-links (the CPU torch wheel) is passed on;
# without one, plain pip resolves torch==2.13.0 as pip is configured on that machine.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$$PIP_FIND_LINKS" ]; then \
	  $(PY) -m pip install -q uv && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --find-links "$$PIP_FIND_LINKS" -e '.[test]'; \
	else \
	  $(PY) -m pip install -q -e '.[test]'; \
	fi
	touch $@

# one MLflow parent run per `make run` (stages of one dvc repro share it)
run: install
	OPD_PIPELINE_KEY=run-$$(date +%Y%m%d-%H%M%S) dvc repro

# the MLflow UI over the default store, on loopback only
ui: install
	mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlruns.db

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .prefect .cache
