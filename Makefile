# tuneloop: `make run` serves the embedded default, `make test` runs the test suite.
# Both create or refresh .venv first (whenever pyproject.toml changed).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit crash-test cluster-test bench-smoke deploy-files clean

install: $(STAMP)

# torch first, pinned: the CPU wheel on disk here. Installed later, or unpinned, pip
# would take the newest CUDA build (several GB) onto a CPU machine. Where pip's own
# configuration has no CPU wheel, TORCH_INDEX names an index that does (README, Set-up).
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/tuneloop run

# Unit tests first, before the integration tests' shared Ray starts: run after it, they
# ran beside its processes and its metrics folder (its environment variables were set).
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow and not cluster" --durations=15 tests/unit tests/integration

# Two Ray nodes of this machine (`ray start --head` + `ray start --address`), storage on a
# local S3 endpoint: a pytest run of its own, as it starts Ray clusters of its own (~2.5 min);
# then a config change rolling the retrain controller under a running job (~2.5 min). Kept
# out of `make test`, which they would take past 15 minutes.
cluster-test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m cluster tests/integration/test_two_nodes.py
	$(BIN)/pytest -q -p no:cacheprovider -m cluster tests/integration/test_serve_config.py

# kill -9 during a feedback flood, then count; a stop with requests in flight: minutes, so
# kept out of `make test`.
crash-test: $(STAMP)
	$(BIN)/pytest -q -s -p no:cacheprovider -m slow tests/integration/test_feedback_crash.py tests/integration/test_stop.py

# Seven benchmark scripts end to end on tiny models and generated data, checking their tables (their own Ray: about 9 minutes).
bench-smoke: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m slow tests/integration/test_bench_smoke.py

# deploy/'s example files, rendered from deploy/tuneloop.cluster.yaml (a test fails if they drift).
deploy-files: $(STAMP)
	$(BIN)/tuneloop deploy render --config deploy/tuneloop.cluster.yaml --target kuberay --dir deploy/kuberay
	$(BIN)/tuneloop deploy render --config deploy/tuneloop.cluster.yaml --target aws --dir deploy/launcher/aws
	tmp=$$(mktemp -d) && sed 's#s3://#gs://#g' deploy/tuneloop.cluster.yaml > $$tmp/tuneloop.cluster.yaml && \
	  $(BIN)/tuneloop deploy render --config $$tmp/tuneloop.cluster.yaml --target gcp --dir deploy/launcher/gcp; \
	  rc=$$?; rm -rf $$tmp; exit $$rc
	$(BIN)/tuneloop deploy render --config deploy/tuneloop.cluster.yaml --target serve --dir deploy/serve

test-unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# The venv and build leftovers only: .tuneloop holds the versions, feedback, journal and API
# keys, which a rebuilt venv must find again (wipe it by hand, knowingly).
clean:
	rm -rf $(VENV) *.egg-info
