# Every option is a make variable passed through to `python -m pipeline <step>`:
#   make features BACKBONE=mobilenet_v2 SIZE=160     (see `make options STEP=features`)
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
TEST_JOBS ?= 2
export PIPELINE_SHARED := $(abspath $(SHARED))

# command-line variables (other than the ones above) become NAME=value options of the step, each value
# exactly as given: not expanded by make ($(value)), single-quoted for the shell (a ' inside becomes '\'')
OWN := PYTHON VENV SHARED STEP TESTS TEST_JOBS
ARGS = $(foreach v,$(filter-out $(OWN),$(sort $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))),'$(v)=$(subst ','\'',$(value $(v)))')

INSTALLED := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

## print this help
help:
	@awk '/^## /{h=substr($$0,4); next} /^[a-z][a-z-]*:/{if(h){split($$0,t,":"); printf "  make %-10s %s\n", t[1], h}; h=""}' $(MAKEFILE_LIST)
	@echo "  Options: make options STEP=<step>; e.g. make features DATA=path/to/tree BACKBONE=mobilenet_v2"

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

## create the virtual environment and install the project (done by every target that needs it)
install: $(INSTALLED)

## the main job, offline: digits through efficientnet_lite0 into cache/, then a head on it
run: head

## extract frozen-backbone features into the HDF5 cache (DATA, BACKBONE, WEIGHTS, SIZE, POOLING, ...)
features: $(INSTALLED)
	$(PY) -m pipeline features $(ARGS)

## train a head on the cache, made first if missing (HEAD=logreg|svm|dense..., its parameters: C=10, HIDDEN=256)
head: $(INSTALLED)
	$(PY) -m pipeline head $(ARGS)

## look at the data through the cache (made first if missing): label issues, duplicates, outliers, balance, calibration, unknown images -> reports/<cache>/audit/index.html
audit: $(INSTALLED)
	$(PY) -m pipeline audit $(ARGS)

## cross-validate every head (HEADS=all, CV=5, JOBS=-1), print the leaderboard, save the best
sweep: $(INSTALLED)
	$(PY) -m pipeline sweep $(ARGS)

## list the head registry: parameters, defaults, sweep grids
heads: $(INSTALLED)
	$(PY) -m pipeline heads

## list what the cache holds
cache: $(INSTALLED)
	$(PY) -m pipeline cache $(ARGS)

## list the backbone registry
backbones: $(INSTALLED)
	$(PY) -m pipeline backbones

## list a step's options: make options STEP=features
options: $(INSTALLED)
	$(PY) -m pipeline $(or $(STEP),features) --help

## run the test suite on TEST_JOBS processes, whole files each (TESTS=tests/test_x.py to pick, TEST_JOBS=0: one)
test: $(INSTALLED) browser
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile $(or $(TESTS),tests)

## the quick subset of the suite: every package, no slow, Ray or browser tests
test-fast: $(INSTALLED)
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile -m "not slow and not ray and not browser" $(or $(TESTS),tests)

## headless Chromium for the test that renders the HTML report (Debian's package, installed when missing)
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 || { echo "make browser: chromium is missing; install Debian's chromium package (needs root)" >&2; exit 2; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## delete the virtual environment (the cache stays)
clean:
	rm -rf $(VENV) *.egg-info

.PHONY: help install run features head audit sweep heads cache backbones options test test-fast browser clean

## measure speed, memory and accuracy side by side (N, REPEATS, SECTIONS=overhead,caching,...): reports/bench-*
bench: $(INSTALLED)
	$(PY) -m pipeline bench $(ARGS)

.PHONY: bench

## fine-tune end to end on the cached dense head (UNFREEZE=block_16|20|0.3|blocks:2|all|none, FINETUNE_EPOCHS, FINETUNE_LR)
finetune: $(INSTALLED)
	$(PY) -m pipeline finetune $(ARGS)

## label images with the fine-tuned model, any head or an export: make predict IMAGES='photo.jpg folder/' (MODEL=, TOP_K=3)
predict: $(INSTALLED)
	$(PY) -m pipeline predict $(ARGS)

## export a model end to end, verified: make export MODEL=... FORMAT=keras|tf_saved_model|onnx|litert|openvino (OUT=)
export: $(INSTALLED)
	$(PY) -m pipeline export $(ARGS)

.PHONY: finetune predict export
