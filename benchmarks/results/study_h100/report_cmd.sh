#!/usr/bin/env bash
# Rebuilds report.md, study_summary.json and the plots of the H100 study from the per-result
# JSONs here (no model is run: --no-run). Add --device cuda and drop --no-run to compute missing
# results on a machine with a GPU and the models (`make data-all`).
cd "$(dirname "$0")/../../.."
M=smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b
METH=auto,int8,fp8,int4,int4-bdr64,int4-bdr64-kc,int4-bdr64-kv-kc,int4-bdr-kc,int4-bdr-kv-kc
METH=$METH,int4-bdr256-kc,int4-bdr256-kv-kc,int4-g32-bdr-kv-kc,int3-bdr-kc,int3-bdr-kv-kc
METH=$METH,int2-bdr-kv-kc,kivi4,kivi2,kmeans4-d2,kmeans4-d2-bdr,gptq4-bdr-kc,mixed4.5-s4,saw-int4
T=ppl-austen,ppl-paulgraham,ppl-wikipedia,arc_easy,arc_challenge,hellaswag,piqa,winogrande,mmlu
T=$T,needle,gsm8k
${PY:-.venv/bin/python} -m sawkv.cli report --no-run --size gpu --out benchmarks/results/study_h100 \
  --models $M --methods $METH --tasks $T "$@" > /dev/null
