#!/usr/bin/env bash
# The accuracy study on one GPU (`sawkv report --size gpu --device cuda`), for the device
# machine, which has no internet and takes at most 64 MiB per call: the real models travel as
# their original GGUF files cut into ~60 MiB parts over several calls to the same warm machine
# (scripts/xfer_parts.py makes the parts here, with a sha256 per model), then each model's study
# runs in the background (setsid) while later parts arrive, and `collect` brings back the
# per-(model, method, task) JSONs. Nothing is re-quantized or faked: the GPU converts the same
# GGUF the CPU converts, with the same code (sawkv.models.hub).
#
#   bash benchmarks/study_gpu.sh stage             # copy the carried .xfer/* into $STAGE
#   bash benchmarks/study_gpu.sh start MODEL       # assemble + check, then in background:
#                                                  #   prepare MODEL (convert) and the study
#   bash benchmarks/study_gpu.sh collect           # results -> $OUT/study.tgz, log tails printed
#
# The machine goes back 30 s after a call ends, killing the background study: issue the calls
# back to back (parts, then `sleep 480; collect` polls) and read the results only afterwards.
set -u
cd "$(dirname "$0")/.."
STAGE=/tmp/sawkv_stage
export SAWKV_CACHE=/tmp/sawkv
RESULTS=/tmp/sawkv_study
LOGS=$RESULTS/logs
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$STAGE" "$SAWKV_CACHE" "$LOGS"

# One H100 hold (~35 min of GPU) cannot score every method on every task of four models, so
# the work comes in tiers, each model's processes sharing the GPU:
#   p0: perplexity (3 texts) for every method, then MC + needle for the remaining methods;
#   p1, p2: MC (6 tasks) + needle for the core methods;  p3: GSM8K (Qwen-1.5B only: the small
#   models score ~0-5% on it, too little to compare methods).
PPL=ppl-austen,ppl-paulgraham,ppl-wikipedia
MC=arc_easy,arc_challenge,hellaswag,piqa,winogrande,mmlu,needle
ALL=auto,int4,int4-bdr-kv-kc,int4-bdr64-kv-kc,int4-bdr64,int4-bdr-kc,kivi4,gptq4-bdr-kc
ALL=$ALL,mixed4.5-s4,kmeans4-d2,kmeans4-d2-bdr,int8,fp8,int4-bdr64-kc,int3-bdr-kc
ALL=$ALL,int3-bdr-kv-kc,int2-bdr-kv-kc,kivi2,int4-g32-bdr-kv-kc,int4-bdr256-kc,int4-bdr256-kv-kc
CORE_A=auto,int4-bdr-kv-kc,gptq4-bdr-kc,mixed4.5-s4,int3-bdr-kv-kc
CORE_B=int4,kivi4,kmeans4-d2-bdr,int8,int4-bdr64-kv-kc
REST=int4-bdr-kc,int4-bdr64,fp8,kivi2,int2-bdr-kv-kc,kmeans4-d2,int4-bdr256-kv-kc
GSM=auto,int4,int4-bdr-kv-kc,kivi4,gptq4-bdr-kc

gguf_target() {  # where sawkv.models.hub looks for this model's GGUF
  python3 -c "from sawkv.models.hub import KNOWN_MODELS as K; print(K['$1'].gguf_rel)" \
    | sed "s|^|$SAWKV_CACHE/|"
}

case "${1:-}" in
  stage)
    cp .xfer/* "$STAGE"/ 2>/dev/null
    # results of an earlier hold (same sizes) are not computed again
    if [ -f "$STAGE/results_prev.tgz" ] && [ ! -f "$RESULTS/.prev" ]; then
      tar xzf "$STAGE/results_prev.tgz" -C "$RESULTS" && touch "$RESULTS/.prev"
    fi
    ;;
  start)
    model=$2
    if [ ! -d /tmp/site/gguf ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        "$STAGE"/gguf-*.whl || exit 1
    fi
    [ -d "$SAWKV_CACHE/data" ] || tar xzf "$STAGE/data.tgz" -C "$SAWKV_CACHE" || exit 1
    target=$(gguf_target "$model")
    mkdir -p "$(dirname "$target")"
    cat "$STAGE/$model".gguf.part* > "$target"
    want=$(cat "$STAGE/$model.sha256")
    got=$(sha256sum "$target" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "sha256 mismatch for $model: $got != $want"; exit 1; }
    echo "$model: GGUF ok ($(du -h "$target" | cut -f1)); study in background, log $LOGS/$model.log"
    S="python3 -m sawkv.cli report --device ${STUDY_DEVICE:-cuda} --size gpu --out $RESULTS --models $model "
    pkill -f -- "--models $model " 2>/dev/null  # a restart after a fix resumes, never doubles
    wait_mu="for i in \$(seq 60); do [ -f $SAWKV_CACHE/$model/k_means.safetensors ] && break; \
      sleep 5; done; sleep 5"
    first="bash $0 prepare $model >> $LOGS/$model.prepare.log 2>&1"
    launch() {  # launch NAME COMMANDS...: one background process (own session) per call
      local name=$1; shift
      setsid nohup bash -c "$*; echo STUDY-DONE" > "$LOGS/$model.$name.log" 2>&1 < /dev/null &
    }
    launch p0 "$first; $S --methods $ALL --tasks $PPL; $S --methods $REST --tasks $MC"
    launch p1 "$wait_mu; $S --methods $CORE_A --tasks $MC"
    core_b=$CORE_B  # with head_dim 64 the bare -bdr is -bdr64: already in CORE_A
    case $model in smollm2-135m|qwen2.5-coder-0.5b) core_b=${CORE_B%,int4-bdr64-kv-kc} ;; esac
    launch p2 "$wait_mu; $S --methods $core_b --tasks $MC"
    if [ "$model" = qwen2.5-coder-1.5b ]; then
      launch p3 "$wait_mu; $S --methods $GSM --tasks gsm8k"
    fi
    ;;
  prepare)  # convert the GGUF; tokenizer files as the CPU converted them (see below)
    model=$2
    dir=$SAWKV_CACHE/models/$model
    python3 -m sawkv.models.hub convert "$model" || exit 1
    # The GPU image's tokenizer libraries turned Gemma's GGUF vocabulary into a different
    # tokenizer (BF16 perplexity 16,000 instead of 25); the weights convert identically. The
    # CPU's tokenizer files travel in model_files.tgz and replace the GPU's, so both machines
    # score the same tokens; any other file that differs is only reported.
    if [ -f "$STAGE/model_files.tgz" ]; then
      mkdir -p /tmp/cpu_files && tar xzf "$STAGE/model_files.tgz" -C /tmp/cpu_files
      for f in /tmp/cpu_files/models/"$model"/*; do
        b=$(basename "$f")
        cmp -s "$f" "$dir/$b" && continue
        case $b in
          tokenizer*|chat_template*) cp "$f" "$dir/$b"; echo "$model: $b differs; CPU's used" ;;
          *) echo "$model: $b differs from the CPU's (kept)" ;;
        esac
      done
    fi
    ;;
  collect)
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      echo "== $(basename "$f"): $(grep -c '^\[study\] ' "$f") done, $(grep -c FAILED "$f") failed"
      grep -E '^\[study\]|STUDY-DONE' "$f" | tail -n 2 | cut -c1-160
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    mkdir -p "$OUT" && tar czf "$OUT/study.tgz" -C "$RESULTS" --exclude='*.png' .
    ;;
  *)
    echo "usage: $0 stage | start MODEL | collect"; exit 2 ;;
esac
