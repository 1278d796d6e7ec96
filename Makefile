# The two commands of the README: `make run` (the pipeline on the embedded default dataset) and
# `make test`. Both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test demo benchmarks benchmark-scale parity clean

setup: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 come from the local wheel store pip is configured with;
# the venv is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,test]"
	touch $(STAMP)

# Ends with the mean over categories of every run (reports/summary.md has the per-category rows;
# `dvc metrics show` prints every metric of every category as a column).
run: setup
	dvc repro
	@awk '/^> \*\*Weights/ || /^\| category/ || /^\|---/ || /^\| \*\*mean/' reports/summary.md

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/streamlit run app/demo.py --server.address 127.0.0.1 --client.toolbarMode viewer

benchmarks: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/score.py
	$(BIN)/python benchmarks/metrics.py

# An MVTec-size category (400 train + 150 test images of 1024 px) through the real extract and
# score code: per stage wall time, peak RSS, bank size, and the physical bound as a ratio; the
# coreset against anomalib's KCenterGreedy (in .venv-anomalib, as `make parity` creates it). Long:
# see `python benchmarks/scale.py --help` for smaller sizes and the ViT configurations.
benchmark-scale: setup
	test -x .venv-anomalib/bin/python || ($(PYTHON) -m venv .venv-anomalib && \
		.venv-anomalib/bin/pip install --quiet -r benchmarks/anomalib-requirements.txt)
	$(BIN)/python benchmarks/scale.py

# vitad's recipes next to anomalib's Patchcore / Padim / AnomalyDINO on the same images and
# weights; anomalib goes into its own venv (.venv-anomalib), never into vitad's.
parity: setup
	$(BIN)/python benchmarks/parity.py

clean:
	rm -rf data/dataset featurebanks scores reports
