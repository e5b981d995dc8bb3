# Both targets create or update .venv themselves (Python 3.12 through pyenv when present).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.nbdask-installed
DEMO    := .demo

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  PYENV_VERSION=3.12.1 python -m venv $(VENV) 2>/dev/null \
	  || python3.12 -m venv $(VENV) \
	  || { echo "nbdask needs Python >= 3.12: install it (pyenv install 3.12) and rerun make" >&2; exit 1; }; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: venv
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/nbdask simulate $(DEMO)/cube.zarr --perturbations 512 --features 512 \
	  --replicates 4 --control-replicates 8 --effect-fraction 0.05 --seed 1 --shards 128
	$(VENV)/bin/nbdask info $(DEMO)/cube.zarr
	$(VENV)/bin/nbdask test $(DEMO)/cube.zarr $(DEMO)/results.zarr --method mom --workers 2
	$(VENV)/bin/nbdask report $(DEMO)/results.zarr --truth $(DEMO)/cube.zarr

test: venv
	$(VENV)/bin/python -m pytest -q -ra

clean:
	rm -rf $(VENV) $(DEMO)
