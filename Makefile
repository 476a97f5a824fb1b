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
	touch $@

# The main job on an embedded default (the packaged all-MiniLM-L6-v2): grow it exactly to
# BERT_BASE width and verify the outputs, then grow it to the full BERT_BASE shape with AKI.
demo: $(VENV)/.installed
	$(BIN)/b2b grow minilm --to layers=6,hidden=768,heads=12,ffn=3072 --width exact --out runs/demo/minilm-w768-exact --overwrite
	$(BIN)/b2b verify minilm runs/demo/minilm-w768-exact
	$(BIN)/b2b grow minilm --to bert-base --width aki --depth stack --out runs/demo/minilm-bert-base-aki --overwrite
	$(BIN)/b2b verify minilm runs/demo/minilm-bert-base-aki

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
