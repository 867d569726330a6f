# `make demo`: install into .venv (reused) and catch the #8233 double count on the bundled fixture.
# `make test`: install into .venv (reused) and run the test suite on the real vLLM engine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-doctor-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml lora_doctor/torchvision_ops.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,test]'
	@# PyPI's torchaudio/torchcodec break `import transformers` beside the CPU torch vLLM pins. torchvision
	@# (vLLM's Qwen-VL model files need it) stays, with its missing operator schemas defined at import by a
	@# .pth hook: see lora_doctor/torchvision_ops.py.
	$(BIN)/python -m pip uninstall --quiet -y torchaudio torchcodec
	$(BIN)/python -m lora_doctor.torchvision_ops
	touch $(STAMP)

demo: install
	@mkdir -p out
	@$(BIN)/lora-doctor check fixtures/checkpoint-500 --plan swift-colocate-lora --json out/demo.json; \
	code=$$?; \
	if [ $$code -eq 1 ]; then echo "demo: exit 1 — the double count was caught (report: out/demo.json)"; \
	else echo "demo: expected exit 1 (double count), got $$code"; exit 1; fi

test: install
	@# The HTML report test renders in headless Chromium (Debian's package).
	bash scripts/ensure-chromium.sh
	@# Lint first: undefined names and unused imports are bugs the happy path never reaches.
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/check_overhead.py

clean:
	rm -rf $(VENV) out
