# The two commands of the README: `make run` (the pipeline on the embedded default dataset) and
# `make test`. Both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test demo exps benchmarks benchmark-scale parity clean remote push pull worker finish fanout

setup: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 come from the local wheel store pip is configured with;
# the venv is rebuilt only when pyproject.toml changes. That torch is a CUDA build: with its
# NVIDIA libraries the venv takes about 7 GiB (SETUP_GIB), checked first rather than pip stopping halfway
# with "No space left on device".
SETUP_GIB := 7
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import importlib.util, shutil, sys; \
	  free = shutil.disk_usage('$(VENV)').free / 2**30; \
	  short = importlib.util.find_spec('torch') is None and free < $(SETUP_GIB); \
	  sys.exit(short and f'make setup: $(VENV) needs about $(SETUP_GIB) GiB (PyTorch with its NVIDIA libraries), {free:.1f} GiB are free there')"
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

# `dvc exp show`, narrow: params that differ, then one line per run whose metrics differ.
exps: setup
	$(BIN)/vitad exps $(ARGS)

benchmarks: setup
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/score.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/predict.py

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

# Sharing work through a DVC remote with the run-cache (README, "Sharing work"). REMOTE: a local
# or mounted directory (the default), s3://bucket/path, gs://bucket/path, ssh://host/path, ...
REMOTE ?= $(abspath $(CURDIR)/../vitad-remote)
remote: setup
	case "$(REMOTE)" in *://*) ;; *) mkdir -p "$(REMOTE)" ;; esac
	dvc remote add --default --force vitad "$(REMOTE)"

push: setup
	dvc push --run-cache

# Restores from the remote whatever someone has computed for these params, computes the rest.
# The dataset first: `repro --pull` counts the missing (never cached) dataset as pulled.
pull: setup
	dvc repro download
	dvc repro --pull

# The extract matrix over WORKERS workers. On a cluster, job WORKER of an array runs `make worker`
# in its own clone (pushing to the remote) and one job runs `make finish` after them all.
WORKERS ?= 2
WORKER ?= 0
worker: setup
	$(BIN)/python -m vitad.fanout worker --index $(WORKER) --count $(WORKERS)

finish: setup
	$(BIN)/python -m vitad.fanout finish

# On one machine: WORKERS git worktrees of HEAD sharing this checkout's DVC cache, worker i on
# GPU i (or on 1/WORKERS of the CPU cores), run in parallel by make; then this checkout finishes.
fanout: setup
	$(BIN)/python -m vitad.fanout worktrees --count $(WORKERS)
	$(MAKE) -j$(WORKERS) $(addprefix fanout-worker-,$(shell seq 0 $$(($(WORKERS) - 1))))
	$(BIN)/python -m vitad.fanout finish --no-pull

fanout-worker-%:
	cd .dvc/tmp/fanout/worker-$* && CUDA_VISIBLE_DEVICES=$* \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(( ($$(nproc) + $(WORKERS) - 1) / $(WORKERS) ))} \
	  $(CURDIR)/$(BIN)/python -m vitad.fanout worker --index $* --count $(WORKERS) --no-push

clean:
	rm -rf data/dataset featurebanks scores reports
