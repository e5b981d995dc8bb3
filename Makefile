# Both targets create or update .venv themselves (Python 3.12 through pyenv when present).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.nbdask-installed
DEMO    := .demo
# Transformer training and its torch tests: PyTorch's CPU build lies on this project's machines
# as a Python 3.11 wheel (torch==2.13.0), so they get a venv of their own.
TVENV   := .venv-train
TPY     := $(TVENV)/bin/python
TSTAMP  := $(TVENV)/.nbdask-installed
TRAIN_DEPS := torch==2.13.0 numpy scipy array-api-compat pytest pytest-timeout

.PHONY: demo test venv train-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  PYENV_VERSION=3.12.1 python -m venv $(VENV) 2>/dev/null \
	  || python3.12 -m venv $(VENV) \
	  || { echo "nbdask needs Python >= 3.12: install it (pyenv install 3.12) and rerun make" >&2; exit 1; }; \
	fi
	@echo "installing nbdask and its test tools into $(VENV) (the first time takes a few minutes)"
	@$(PY) -m pip install -qq --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -qq --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

train-venv: $(TSTAMP)

$(TSTAMP): pyproject.toml
	@if [ ! -x $(TPY) ]; then \
	  PYENV_VERSION=3.11.7 python -m venv $(TVENV) 2>/dev/null || python3.11 -m venv $(TVENV) \
	  || { echo "the training venv needs Python 3.11 (torch's CPU wheel here is cp311)" >&2; exit 1; }; \
	fi
	$(TPY) -m pip install -q $(TRAIN_DEPS)
	@touch $(TSTAMP)

demo: venv
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/nbdask simulate $(DEMO)/cube.zarr --perturbations 512 --features 512 \
	  --replicates 4 --control-replicates 8 --effect-fraction 0.05 --seed 1 --shards 128
	$(VENV)/bin/nbdask info $(DEMO)/cube.zarr
	$(VENV)/bin/nbdask test $(DEMO)/cube.zarr $(DEMO)/results.zarr --method mom --workers 2
	$(VENV)/bin/nbdask export $(DEMO)/results.zarr $(DEMO)/hits.csv --q-max 0.1
	$(VENV)/bin/nbdask report $(DEMO)/results.zarr --truth $(DEMO)/cube.zarr --html $(DEMO)/report.html
	@echo
	@echo "The report: $(CURDIR)/$(DEMO)/report.html (open it in a browser)"
	@echo "The hits:   $(CURDIR)/$(DEMO)/hits.csv (one row per comparison with q <= 0.1)"

test: venv train-venv
	$(VENV)/bin/python -m pytest -q -ra
	# nbdask runs from the source tree here: inference and training need only numpy/scipy/torch
	PYTHONPATH=$(CURDIR) $(TPY) -m pytest -q -ra -p no:cacheprovider tests/test_train.py

clean:
	rm -rf $(VENV) $(TVENV) $(DEMO)
