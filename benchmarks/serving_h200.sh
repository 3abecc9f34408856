#!/usr/bin/env bash
# Real serving runs on the GPU machine: installs the server's wheels if the image lacks them,
# then runs one slice of benchmarks/serving_h200.py (see its docstring). Results go to $OUT.
#   bash benchmarks/serving_h200.sh run --methods bf16 --workload long --concurrency 1,16
#   bash benchmarks/serving_h200.sh merge <dirs...> --out benchmarks/results/serving_h200.json
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import fastapi, uvicorn, pydantic" 2>/dev/null; then
  # fastapi, uvicorn, pydantic (+ deps) travel as wheels in .whl/ (no internet on the device)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export OUT=${OUT:-benchmarks/results/h200}
exec python3 benchmarks/serving_h200.py "$@"
