#!/usr/bin/env bash
# One device call's worth of kernel measurements, in priority order, each step under its own
# time limit, results packed into one file (the device tool returns only a few files per call):
#
#   bash benchmarks/gpu_session.sh kernels    # ~8 min: GPU tests, kernel checks + timings
#                                             #   (isolated and back to back), small-batch
#                                             #   latency, ncu of the decode kernel (NO_NCU=1:
#                                             #   none, ~6 min)
#   bash benchmarks/gpu_session.sh w8         # ~5.5 min: checks + decode at 8 warps per CTA,
#                                             #   extend (the SDPA path's timings)
#   bash benchmarks/gpu_session.sh write      # ~3 min: kernel checks + write timings
#   bash benchmarks/gpu_session.sh engine     # ~6 min: GPU engine tests (CUDA decode on and
#                                             #   off), decode-step device time per kernel (c=1)
#   bash benchmarks/gpu_session.sh prefill    # ~6 min: 16K-token engine prefill vs bf16, ncu 1x32K
#   bash benchmarks/gpu_session.sh alt .alt/paged_decode.cuh
#                                             # ~4 min: the alternative's checks + decode only
#   bash benchmarks/gpu_session.sh c1async [C]  # ~5 min: concurrency C (1) offline, sync vs async
#   bash benchmarks/gpu_session.sh c1w8 [C]   # ~5 min: concurrency C (1) offline: bf16, int4-bdr128
#                                             #   at 4 and at 8 warps per CTA (the env knob)
#   bash benchmarks/gpu_session.sh ttft       # ~7 min: engine time to first tokens, per kernel
#   bash benchmarks/gpu_session.sh c1         # ~5 min: c=1 decode-step kernels and idle gaps, ncu
#   bash benchmarks/gpu_session.sh flush      # ~2 min: decode timed with do_bench's dirty flush
#   bash benchmarks/gpu_session.sh serving M  # ~9 min: HTTP serving of method M, long c=64 and
#                                             #   short c=16,64,128 (needs `carry: [".whl"]`)
#   bash benchmarks/gpu_session.sh ab .alt/paged_decode.cuh
#                                             # ~7 min: checks + decode timings of the kernel as
#                                             #   committed, then of an alternative source (e.g.
#                                             #   `git show BRANCH:sawkv/kernels/csrc/paged_decode.cuh
#                                             #   > .alt/paged_decode.cuh`, `carry: [".alt"]`)
#
# Everything lands in $OUT/<part>.tgz; unpack it here and commit what the README quotes.
# SAWKV_EXT_DIR keeps the CUDA extension between calls on the same warm machine.
set -u
cd "$(dirname "$0")/.."
export SAWKV_EXT_DIR=$PWD/.ext PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder whose files come back}
part=${1:?kernels or serving}
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$work/gpu.txt"

ncu_decode() {  # $1 method, $2 batch, $3 context: counters and stall reasons of one launch
  [ "${NO_NCU:-0}" = 1 ] && return  # NO_NCU=1: skip the profiles (~1 min each)
  timeout 60 ncu --clock-control none -k regex:paged_decode -c 1 --print-details all \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    python benchmarks/profile_decode.py --method "$1" --batch "$2" --context "$3" \
    > "$work/ncu_${1}_${2}x${3}.txt" 2>&1
  grep -E " Duration|DRAM Throughput|Issued Warp|Eligible Warps|stalled" \
    "$work/ncu_${1}_${2}x${3}.txt" | head -20
}

case "$part" in
  kernels)
    timeout 200 python -m pytest -q -x tests/engine/test_gpu.py 2>&1 | tail -5
    timeout 420 python benchmarks/bench_kernels.py --only check,long,decode,latency,write \
      --out "$work" > "$work/bench_kernels_log.txt" 2>&1
    grep -E "^latency" "$work/bench_kernels_log.txt" | tail -48
    tail -60 "$work/bench_kernels_log.txt"
    ncu_decode int4-bdr128 256 2048
    ncu_decode int8 256 2048
    ncu_decode int4-bdr128 1 32768
    ;;
  w8)  # the CUDA decode at 8 warps per CTA: checks (every d=128 case also at 8 warps) and the
        # decode table at 8 warps, to set beside `kernels` run just before on the same machine;
        # then the extend timings (the 8 warps do not touch them)
    timeout 420 python benchmarks/bench_kernels.py --only check,decode,extend --cta-warps 8 \
      --name kernels_w8 --out "$work" > "$work/bench_w8_log.txt" 2>&1
    grep -E "w8_rel|failed|Error|error" "$work/bench_w8_log.txt" | tail -5
    tail -52 "$work/bench_w8_log.txt"
    ;;
  write)  # correctness pass (every format, the 128K check) and the write timings only
    timeout 300 python benchmarks/bench_kernels.py --only check,write --name kernels_write \
      --out "$work" > "$work/bench_write_log.txt" 2>&1
    grep -E "^write|failed|Error|error" "$work/bench_write_log.txt" | tail -30
    ;;
  serving)
    method=${2:?serving needs a method: bf16, int4-bdr128, int8}
    timeout 540 bash benchmarks/serving_h200.sh run --methods "$method" --workload long=64 \
      --workload short=16,64,128 --budget-s 520 --out "$work/serving_$method" 2>&1 | tail -12
    ;;
  ab)
    alt=${2:?ab needs the alternative paged_decode.cuh}
    cp "$alt" "$work/alt_paged_decode.cuh"
    for variant in base alt; do
      [ "$variant" = alt ] && cp "$work/alt_paged_decode.cuh" sawkv/kernels/csrc/paged_decode.cuh
      timeout 270 python benchmarks/bench_kernels.py --only check,decode --name "kernels_$variant" \
        --out "$work" > "$work/ab_$variant.txt" 2>&1
      echo "== $variant"; grep -E "^decode|Error|error" "$work/ab_$variant.txt" | tail -16
    done
    ;;
  alt)  # checks + decode timings of an alternative source only (its baseline: `kernels` on the
        # same warm machine, just before)
    alt=${2:?alt needs the alternative paged_decode.cuh}
    cp "$alt" "$work/alt_paged_decode.cuh"
    cp "$alt" sawkv/kernels/csrc/paged_decode.cuh
    timeout 280 python benchmarks/bench_kernels.py --only check,decode --name kernels_alt \
      --out "$work" > "$work/alt.txt" 2>&1
    grep -E "^decode|failed|Error|error" "$work/alt.txt" | tail -30
    ;;
  c1async)  # D(256,1024) through the engine at concurrency ${2:-1}, sync vs async scheduling:
            # the host's share of a step (async_scheduling_h100.json: c=1 and c=64)
    c=${2:-1}
    for m in bf16 int4-bdr128; do
      for a in --no-async-scheduling --async-scheduling; do
        timeout 140 python3 -c "from sawkv.cli import main; main()" bench throughput --model qwen3-8b --load-format dummy --kv-cache-dtype $m \
          --input-len 256 --output-len 1024 --concurrency $c --num-requests $((c > 1 ? c : 2)) \
          --max-model-len 17920 --max-num-seqs $((c > 16 ? c : 16)) $a --method "$m$a" \
          --json "$work/c${c}_${m}${a}.json" > "$work/c${c}_${m}${a}.txt" 2>&1
        grep -E "decode|offline" "$work/c${c}_${m}${a}.txt" | tail -2
      done
    done
    ;;
  c1w8)  # D(256,1024) through the engine at concurrency ${2:-1}: bf16, then int4-bdr128 with the
          # CUDA decode at 4 and at 8 warps per CTA (SAWKV_DECODE_CTA_WARPS, plan.py)
    c=${2:-1}
    for run in "bf16 4" "int4-bdr128 4" "int4-bdr128 8"; do
      set -- $run
      SAWKV_DECODE_CTA_WARPS=$2 timeout 150 python3 -c "from sawkv.cli import main; main()" \
        bench throughput --model qwen3-8b --load-format dummy --kv-cache-dtype "$1" \
        --input-len 256 --output-len 1024 --concurrency "$c" --num-requests $((c > 1 ? c : 2)) \
        --max-model-len 17920 --max-num-seqs $((c > 16 ? c : 16)) --method "$1-w$2" \
        --json "$work/c${c}_$1_w$2.json" > "$work/c${c}_$1_w$2.txt" 2>&1
      grep -E "decode|offline" "$work/c${c}_$1_w$2.txt" | tail -2
    done
    ;;
  ttft)  # what a first token costs in the engine, bf16 vs int4-bdr128: short prompts alone
         # and 16 at once, and the reasoning burst (256 x 1K under the server's 8K chunk budget)
    for spec in "1 256 --steps 50" "16 256 --steps 50" "256 1024 --steps 20 --max-batched 8192"; do
      set -- $spec
      timeout 220 python benchmarks/profile_step.py --prefill --methods bf16,int4-bdr128 \
        --batch "$1" --input-len "$2" "${@:3}" --max-model-len 17920 --out "$work" \
        > "$work/profile_prefill_b$1_log.txt" 2>&1
      tail -12 "$work/profile_prefill_b$1_log.txt"
    done
    ;;
  c1)  # why c=1 decode steps are slower than BF16's: kernel time and GPU idle gaps per step, ncu
    timeout 330 python benchmarks/profile_step.py --methods bf16,int4-bdr128 --batch 1 --trace \
      --max-model-len 17920 --out "$work" > "$work/profile_step_b1_log.txt" 2>&1
    tail -16 "$work/profile_step_b1_log.txt"
    ncu_decode int4-bdr128 1 512
    ncu_decode int4-bdr128 1 32768
    ;;
  flush)  # decode timings with the old (zero-fill, dirty L2) flush, to compare with `kernels`
    SAWKV_BENCH_FLUSH=zero timeout 200 python benchmarks/bench_kernels.py --only decode \
      --name kernels_zeroflush --out "$work" > "$work/zeroflush_log.txt" 2>&1
    grep -E "^decode" "$work/zeroflush_log.txt" | tail -42
    ;;
  engine)  # GPU engine tests (CUDA decode on, then off), then device time per decode step by kernel
    timeout 200 python -m pytest -q -x -p no:logging tests/engine/test_gpu.py 2>&1 | tail -3
    SAWKV_CUDA_DECODE=0 timeout 150 python -m pytest -q -x -p no:logging tests/engine/test_gpu.py \
      2>&1 | tail -3
    timeout 320 python benchmarks/profile_step.py --methods bf16,int4-bdr128 --batch 1 \
      --out "$work" > "$work/profile_step_b1_log.txt" 2>&1
    tail -14 "$work/profile_step_b1_log.txt"
    ;;
  prefill)  # engine prefill of a 16K prompt, alone and under decode load, then ncu of 1x32K decode
    timeout 330 python benchmarks/bench_prefill.py --out "$work" > "$work/prefill_log.txt" 2>&1
    tail -12 "$work/prefill_log.txt"
    ncu_decode int4-bdr128 1 32768
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
tar czf "$OUT/$part.tgz" -C "$work" . && ls -la "$OUT"
