# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench notebooks clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins every package to the versions CI tests with
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: a local Ray, the generated phantom data set, a CPU budget without a GPU.
run: install
	$(BIN)/cxr-search run inception

test: install
	$(BIN)/python -m pytest -q

# The analysis notebooks executed on one experiment: make notebooks EXP=experiments/<name> [OUT=folder]
EXP ?=
OUT ?= $(EXP)/notebooks
notebooks:
	@test -n "$(EXP)" || { echo "usage: make notebooks EXP=experiments/<name> [OUT=folder]" >&2; exit 2; }
	@$(MAKE) --no-print-directory install
	$(BIN)/python analysis/run_notebooks.py "$(EXP)" --out "$(OUT)"

lint: install
	$(BIN)/ruff check cxr_search tests benchmarks analysis

bench: install
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/throughput.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache
