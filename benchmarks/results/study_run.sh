#!/usr/bin/env bash
# The accuracy study as it was run for benchmarks/results/report.md (CPU, 2 shared cores,
# niced), in priority order: every `sawkv report` call is resumable (one JSON per
# model x method x task), so the script can be stopped and started again at any point; the last
# call only re-reads results and rewrites report.md, study_summary.json and the plots.
#   nohup bash benchmarks/results/study_run.sh > /tmp/study.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
S="nice -n 10 .venv/bin/python -m sawkv.cli report --size cpu"
PPL=ppl-austen,ppl-paulgraham,ppl-wikipedia
CORE=auto,int8,fp8,int4,int4-bdr64,int4-bdr64-kc,int4-bdr-kv-kc,int3-bdr-kc,int2-bdr-kv-kc
BASE=kivi4,kivi2,gptq4-bdr-kc,mixed4.5-s4
# k-means codebooks are fitted on the GPU (study_kmeans.py), then scored here on CPU
KM=kmeans4-d2,kmeans4-d2-bdr
MC=arc_easy,hellaswag,piqa
FEW=auto,int4,int4-bdr64-kc,int4-bdr-kv-kc,kivi2,mixed4.5-s4
ALL=smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b

$S --models smollm2-135m --methods $CORE,$BASE --tasks $PPL
$S --models gemma3-270m --methods $CORE,$BASE --tasks ppl-austen,ppl-wikipedia
$S --models qwen2.5-coder-0.5b --methods $CORE,kivi4,kivi2,gptq4-bdr-kc,mixed4.5-s4 --tasks ppl-austen
$S --models qwen2.5-coder-1.5b --methods auto,int8,int4,int4-bdr128,int4-bdr128-kc,int4-bdr-kv-kc --tasks ppl-austen
$S --models smollm2-135m --methods $FEW --tasks $MC,needle
$S --models qwen2.5-coder-1.5b --methods int3-bdr-kc,kivi4,gptq4-bdr-kc --tasks ppl-austen
$S --models gemma3-270m --methods $FEW --tasks $MC,needle
$S --models smollm2-135m --methods $KM --tasks $PPL
$S --models gemma3-270m,qwen2.5-coder-0.5b --methods $KM --tasks ppl-austen
$S --models gemma3-270m --methods $CORE,$BASE --tasks ppl-paulgraham
$S --models smollm2-135m --methods $CORE,$BASE --tasks $MC,winogrande,needle
$S --models smollm2-135m --methods auto,int4-bdr64-kc --tasks gsm8k
$S --no-run --models $ALL --methods $CORE,$BASE,$KM,int4-bdr128,int4-bdr128-kc \
  --tasks $PPL,$MC,winogrande,mmlu,arc_challenge,needle,gsm8k
