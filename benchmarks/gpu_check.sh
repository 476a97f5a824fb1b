#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): bf16 training speed, MFU and memory of the
# cluster recipes, exact resume, b2b grow and megatron-core at TP 1, in one JSON file.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--out FILE]     # default runs/gpu_check/gpu_check.json
#
# A bare GPU machine has its own python3 with torch, transformers and tensorboard but not
# DeepSpeed, datasets or megatron-core, and may reach no package index: those come as wheels in
# .whl/ (benchmarks/gpu_wheels.sh fills it where pip reaches PyPI) and are installed into
# /tmp/b2b-site here, from the files alone. With this checkout's .venv, that python runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
# found, not imported (importing megatron-core alone takes seconds)
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
     deepspeed datasets megatron.core 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY lacks deepspeed, datasets or megatron-core, and .whl/ holds no wheels to install" \
         "them from: run bash benchmarks/gpu_wheels.sh where pip reaches PyPI, and bring .whl/" >&2
    exit 2
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/b2b-site .whl/*.whl
  export PYTHONPATH=/tmp/b2b-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
