#!/usr/bin/env bash
# One device call: the GPU tests of attention sinks (CUDA decode with sinks against the
# reference, the engine with a sink recipe against the torch backend), then the decode A/B of
# gpu_session.sh (`carry: [".alt"]`).
set -u
cd "$(dirname "$0")/.."
export SAWKV_EXT_DIR=$PWD/.ext PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 170 python -m pytest -q -x tests/engine/test_gpu.py -k "sinks or graph" 2>&1 | tail -6
bash benchmarks/gpu_session.sh ab .alt/paged_decode.cuh 2>&1 | tail -40
