#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a bare GPU machine that reaches no package index:
# what this project needs beyond that machine's own python3 (torch, transformers, tokenizers,
# tensorboard, accelerate, ... are there), at the versions this checkout's .venv runs. Run it here,
# where pip reaches PyPI; it fills .whl/ (ignored by git; carried to the GPU machine).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   # default 3.12, the GPU machine's
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PIP=.venv/bin/pip
version() { $PIP show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
# pure-Python or per-platform wheels from PyPI
for name in megatron-core datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection hjson; do
  $PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$name==$(version "$name")"
done
# DeepSpeed publishes a source distribution only: built here into a pure-Python wheel (no
# prebuilt ops; the trainer's default AdamW kernel is torch's, so none is compiled there)
[ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || \
  DS_BUILD_OPS=0 $PIP wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -la .whl
du -sh .whl
