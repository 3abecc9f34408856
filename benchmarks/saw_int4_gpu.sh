#!/usr/bin/env bash
# saw-int4 accuracy on the device GPU: calibrate each model's recipe, then perplexity (8 x 1,024
# tokens, 3 texts) of auto, saw-int4 and the two baselines through the study code path
# (`sawkv report --size gpu`). Staging is study_gpu.sh's (GGUF parts carried over several calls
# to one warm machine, tokenizer files as converted on the CPU):
#
#   bash benchmarks/saw_int4_gpu.sh stage          # copy the carried .xfer/* into the stage
#   bash benchmarks/saw_int4_gpu.sh start MODEL    # assemble + check, then in background:
#                                                  #   convert, calibrate, score
#   bash benchmarks/saw_int4_gpu.sh collect        # results -> $OUT/saw_int4.tgz
set -u
cd "$(dirname "$0")/.."
STAGE=/tmp/sawkv_stage
export SAWKV_CACHE=/tmp/sawkv
RESULTS=/tmp/saw_int4
LOGS=$RESULTS/logs
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p "$STAGE" "$SAWKV_CACHE" "$LOGS"
PPL=ppl-austen,ppl-paulgraham,ppl-wikipedia
METHODS=${METHODS:-auto,saw-int4,int4-bdr64-kv-kc,mixed4.5-s4}

case "${1:-}" in
  stage) bash benchmarks/study_gpu.sh stage ;;
  start)
    model=$2
    if [ ! -d /tmp/site/gguf ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        "$STAGE"/gguf-*.whl || exit 1
    fi
    [ -d "$SAWKV_CACHE/data" ] || tar xzf "$STAGE/data.tgz" -C "$SAWKV_CACHE" || exit 1
    target=$SAWKV_CACHE/$(python3 -c "from sawkv.models.hub import KNOWN_MODELS as K; \
print(K['$model'].gguf_rel)")
    mkdir -p "$(dirname "$target")"
    cat "$STAGE/$model".gguf.part* > "$target"
    [ "$(cat "$STAGE/$model.sha256")" = "$(sha256sum "$target" | cut -d' ' -f1)" ] \
      || { echo "sha256 mismatch for $model"; exit 1; }
    R="python3 -m sawkv.cli"
    setsid nohup bash -c "bash benchmarks/study_gpu.sh prepare $model; \
      $R calibrate --device cuda --model $model --json $RESULTS/recipe_$model.json; \
      $R report --device cuda --size gpu --out $RESULTS --models $model --methods $METHODS \
        --tasks $PPL; echo STUDY-DONE" > "$LOGS/$model.log" 2>&1 < /dev/null &
    echo "$model: started, log $LOGS/$model.log"
    ;;
  collect)
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      echo "== $(basename "$f")"; grep -E '^\[study\]|STUDY-DONE|Error|error' "$f" | tail -n 12 | cut -c1-200
    done
    mkdir -p "$OUT" && tar czf "$OUT/saw_int4.tgz" -C "$RESULTS" --exclude='*.png' .
    ;;
  *) echo "usage: $0 stage | start MODEL | collect"; exit 2 ;;
esac
