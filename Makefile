# One entry point for everything: `make demo` runs the main job on the embedded default
# cluster, `make test` runs every check CI runs. Both install what is missing first.
SHELL := /bin/bash
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
# torch-sys finds libtorch through the venv's python (tch =0.24.0 <-> torch 2.11.0).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export CARGO_TERM_COLOR ?= never
# CI builds once from a clean clone: incremental caches would only take disk (~1.3 GB).
ifdef CI
export CARGO_INCREMENTAL := 0
endif

.PHONY: setup build demo readme-plot test fmt lint

setup:
	@bash scripts/setup.sh

build: setup
	cargo build --release --workspace

# The tiny model and its data are generated once (mm-engine synth); each demo run trains from
# them into runs/tiny/save. The launcher finds mm-engine on PATH.
demo: build
	@test -f runs/tiny/model/config.json || ./target/release/mm-engine synth --out runs/tiny
	PATH=$(ROOT)/target/release:$$PATH ./target/release/launch --cluster clusters/local.yaml finetune tiny
	-./target/release/launch plot --metric loss --metric tokens_per_sec --metric mfu
	-./target/release/launch logs --summary

# The README's picture, from the latest run (make demo's).
readme-plot:
	./target/release/launch plot --metric loss --metric tokens_per_sec --metric mfu --out docs/img/demo-metrics.png

fmt:
	cargo fmt --all --check

lint: setup
	cargo clippy --workspace --all-targets -- -D warnings

test: setup
	cargo fmt --all --check
	bash scripts/check-no-libtorch.sh
	bash scripts/import-graph.sh
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace --no-fail-fast
