# dna_jax: `make demo` sets everything up and runs the main job; `make test` runs the tests.
# Both create the virtual environment (.venv) and install the Fashion-MNIST data if missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= workdir/fashion_mnist_dna
PYTEST_ARGS ?= -n 2

.PHONY: setup setup-port data demo info test test-slow clean

# The optional `port` extra (torch CPU build + timm) for the timm parity tests.
TORCH_VERSION ?= 2.13.0

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(VENV)/.port-installed: $(VENV)/.installed
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -e '.[test,port]'
	touch $@

setup-port: $(VENV)/.port-installed

# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist package (idx files).
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

info: setup
	$(VENV)/bin/dna-jax info

demo: setup data
	$(VENV)/bin/dna-jax run --config configs/fashion_mnist_dna.py --workdir $(WORKDIR)

test: setup-port data
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the test setup is broken" >&2; exit 1; fi; \
	exit $$rc

test-slow: setup-port data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
