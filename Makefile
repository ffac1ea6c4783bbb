# msmoe — set-up, tests, training, benchmarks.
#   make setup   create .venv with the pinned dependencies (idempotent, re-runs when pins change)
#   make test    set up, then run the whole test suite (what CI runs)
#   make train   set up, make the default data if missing, train it with 2 processes and EP=2, evaluate, report
#   make bench   set up, then print the layer benchmark
#   make report  set up, run a small scaling sweep (1-2 processes, EP 1/2, 4/8 experts), write runs/scale/report.md
#   make validation  set up, sweep 1/2/4 processes x EP 1/2/4 (~5 min on 2 cores), write runs/validation/report.md:
#                the projection model fitted on <= 2 processes, its error on the 4-process points
#   make cluster  set up, then (as root) train configs/hierarchical.yaml shrunk on 2 emulated nodes x 2 processes
#                (network namespaces, 200 Mbit/s tbf links) at EP=4 with train.transport=flat and node_local into
#                runs/cluster-flat and runs/cluster-node_local; prints their cross-node bytes and step time
#   make cluster-report  set up, then (as root) the scaling sweep on emulated clusters of 1, 2 and 4 nodes x 2
#                processes (100 Mbit/s tbf node links; each multi-node point with its one-node twin) and flat vs
#                node-local placement on 2 nodes, into runs/cluster-scale; writes runs/cluster-scale/report.md: the
#                link model fitted on 1-2 nodes, its error on the held-out 4-node points (~8 min on 2 cores)
#   make gpu-bundle  set up, then download into .whl/ the wheels a GPU node without network lacks (deepspeed built
#                here, its requirements, datasets, fairscale; cp312 manylinux; never torch nor any distribution of
#                the node's image, gpucheck/gpu_node_packages.txt); prints the size (< 40 MiB)
#   make gpu-standin  (not in CI, ~5 GB download) the GPU node's Python 3.12 + torch 2.11 stack on CPU, offline:
#                the bundle installed as on the node, the check's quick dry run, the fast test suite
#   make gpu-check OUT=dir  on the GPU node, with its own python3 and torch: install into /tmp/msmoe-site the wheels
#                of .whl/ the node lacks (those it has are skipped, by name) and run the prepared check (<= 8 min on one H100): log, results.json, results.md in OUT (runs/gpu-check)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

SHARED     ?= ../shared
STANDIN    ?= /tmp/gpu-standin
GPU_PYTHON ?= python3
GPU_SITE   ?= /tmp/msmoe-site
OUT        ?= runs/gpu-check

.PHONY: setup test test-fast train bench report validation cluster cluster-report gpu-bundle gpu-check gpu-standin clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"msmoe needs Python 3.11, found {sys.version}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone, so the local CPU build is what every later package sees.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	$(PY) -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
	# DeepSpeed's CPU communication op, built once here (build/torch_extensions) rather than inside the first run
	$(PY) -m parallel.ds_ops
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

train: setup
	$(VENV)/bin/msmoe data synth --config configs/default.yaml
	$(VENV)/bin/msmoe train --config configs/default.yaml --nproc 2 --overwrite

bench: setup
	$(VENV)/bin/msmoe bench layer

report: setup
	rm -rf runs/scale
	$(VENV)/bin/msmoe scale --config configs/scale.yaml --world 1,2 --ep 1,2 --experts 4,8 --modes strong,weak
	$(VENV)/bin/msmoe report --points runs/scale/points.jsonl

validation: setup
	rm -rf runs/validation
	$(VENV)/bin/msmoe scale --config configs/scale.yaml --validation
	$(VENV)/bin/msmoe report --points runs/validation/points.jsonl --fit-max-world 2

cluster: setup
	$(VENV)/bin/msmoe cluster --config configs/hierarchical.yaml --nodes 2 --nproc-per-node 2 --rate-mbit 200 --ep-size 4

cluster-report: setup
	rm -rf runs/cluster-scale
	$(VENV)/bin/msmoe scale --config configs/scale.yaml --cluster 1,2,4 --nproc-per-node 2 --link-mbit 100 \
		--run-root runs/cluster-scale
	$(VENV)/bin/msmoe report --points runs/cluster-scale/points.jsonl --fit-max-nodes 2

gpu-bundle: setup
	$(PY) -m gpucheck.bundle --out .whl

# Not the venv: the node's own interpreter and torch. The preflight says in one line why the
# check cannot run here (no torch, no CUDA) before anything is installed.
gpu-check:
	@$(GPU_PYTHON) -m gpucheck.check --preflight
	@ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu-check: no wheels in .whl/: run make gpu-bundle where the package registry is reachable and bring .whl/ with the checkout" >&2; exit 2; }
	rm -rf $(GPU_SITE)
	# wheels whose distribution the node already has are skipped, by name; the rest go to $(GPU_SITE)
	$(GPU_PYTHON) -m gpucheck.bundle --out .whl --install-into $(GPU_SITE)
	PYTHONPATH=$(GPU_SITE):. $(GPU_PYTHON) -m gpucheck.check --out $(OUT)

# Not in CI (it downloads ~5 GB): the GPU node's Python/torch stack on this CPU machine, offline
# ($(SHARED)/tools/gpu-node-standin): build it, add the image's distributions the bundle relies on that the
# stand-in's build leaves out, install the bundle the way make gpu-check does, then the quick dry run of
# every section from a cold extension cache and the fast test suite.
gpu-standin: gpu-bundle
	$(SHARED)/tools/gpu-node-standin build
	$(STANDIN)/node/bin/python -m gpucheck.bundle --out .whl --image-missing | xargs -r $(STANDIN)/node/bin/python -m pip install -q --no-deps
	rm -rf $(STANDIN)/site $(STANDIN)/torch_ext $(STANDIN)/dry
	$(SHARED)/tools/gpu-node-standin run $(STANDIN)/node/bin/python -m gpucheck.bundle --out .whl --install-into $(STANDIN)/site
	# the shared tool's own `dry` names the old module (bench.gpu_check): the same run through `run`
	$(SHARED)/tools/gpu-node-standin run $(STANDIN)/node/bin/python -m gpucheck.check --out $(STANDIN)/dry --allow-cpu --device cpu --quick
	$(SHARED)/tools/gpu-node-standin fast

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
