# imfree: `make demo` runs the whole job, `make test` the test suite.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch build to install; override for another CUDA or CPU build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

# Demo settings: the tiny test model with random weights runs anywhere,
# offline, in about a minute. For real tags: make demo MODEL=RN50 PRETRAINED=openai
MODEL ?= imfree-tiny-rn
PRETRAINED ?= none
LABELS ?= voc2007
IMAGES ?= examples/images
RUNS ?= runs/demo
# The lab: a rendered world, a CLIP trained on it here, and the ablation table.
# make demo-lab LAB_MODEL=vit for the ViT variant.
LAB_MODEL ?= rn
LAB_OUT ?= runs/lab

.PHONY: install demo demo-lab test test-fast bench lint corpus clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $(STAMP)

demo-lab: install
	$(BIN)/python -m imfree.lab --model $(LAB_MODEL) --out $(LAB_OUT)/$(LAB_MODEL) \
		--cache $(LAB_OUT)/cache

demo: install
	$(BIN)/imfree train --labels $(LABELS) --model $(MODEL) --pretrained $(PRETRAINED) \
		--out $(RUNS)/classifier
	$(BIN)/imfree export $(RUNS)/classifier --out $(RUNS)/export
	$(BIN)/imfree infer $(IMAGES) --model $(RUNS)/export --out $(RUNS)/tags.csv
	@echo "--- $(RUNS)/tags.csv"
	@cat $(RUNS)/tags.csv

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/pipeline_times.py --model RN50 --pretrained none

lint: install
	$(BIN)/ruff check imfree tests benchmarks

# Rebuild a bundled corpus.jsonl from its raw LLM answers (sentences.jsonl).
corpus: install
	$(BIN)/python -m imfree.toolkit.corpus $(LABELS)

clean:
	rm -rf runs .pytest_cache
