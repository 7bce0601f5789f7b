# Install, test and run the main job. `make install` works on a fresh machine of the CI kind.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ARTIFACTS ?= artifacts/offline-default
CONFIG ?= configs/offline-default.yaml
TORCH_INDEX ?=

.PHONY: install install-data test demo lint serve

$(PY):
	python3 -m venv $(VENV)

install: $(PY) install-data
	# torch/torchvision at the versions the project is tested with. PyPI's Linux torch wheel pulls CUDA libraries
	# (several GB); for a CPU-only install add TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu (as the
	# Docker images do). Where pip is set up with local wheels (the CI machines) it takes them from there.
	$(PIP) install -q $(TORCH_INDEX) torch==2.14.1 torchvision==0.29.1
	# The packages the offline backbone records in its artefacts at the versions the Docker images install
	# (docker/constraints.txt): artefacts built here load in the images and the other way round. The test-only
	# packages at the versions the suite runs with (tests/constraints.txt).
	$(PIP) install -q -c docker/constraints.txt -c tests/constraints.txt -e '.[offline,dev]'

DATA_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default

install-data:
	# Real images for the offline benchmarks (Debian packages; see README for sizes): as root, else through sudo.
	@if command -v apt-get >/dev/null && ! dpkg -s $(DATA_PACKAGES) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "make: the Debian packages $(DATA_PACKAGES) are missing; as root: apt-get install --no-install-recommends $(DATA_PACKAGES)" >&2; \
	    exit 2; \
	  fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DATA_PACKAGES); \
	fi

test:
	$(PY) -m pytest -q -x

demo:
	$(VENV)/bin/sglora pipeline --config $(CONFIG) --out $(ARTIFACTS)

serve:
	$(VENV)/bin/sglora serve --artifacts $(ARTIFACTS)

lint:
	$(VENV)/bin/ruff check .
