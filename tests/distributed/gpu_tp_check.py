"""GPU check (not collected by pytest; run through the device tool on 2 GPUs): greedy output of
a tiny random Qwen3 at TP=2 (NCCL, CUDA graphs) against TP=1, bf16 and int4-bdr64 KV.

bf16 partial sums reduced across ranks round differently from one full matmul, so a late
token may differ; the script reports the fraction of identical tokens and the first
divergence per prompt, and the check passes at >= 90% identical tokens.

    PYTHONPATH=. python tests/distributed/gpu_tp_check.py OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch


def main(out: str) -> None:
    import transformers

    from sawkv import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=1024, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 40, 130, 300)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    report = {}
    for kv in ("auto", "int4-bdr64"):
        outs = {}
        for tp in (1, 2):
            llm = LLM(path, kv, tensor_parallel_size=tp, max_model_len=512, max_num_seqs=8,
                      num_gpu_blocks=256, enable_compile=False)  # fmt: skip
            outs[tp] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            if tp > 1:
                llm.engine.runner.shutdown()
            del llm
        same = sum(a == b for r1, r2 in zip(outs[1], outs[2]) for a, b in zip(r1, r2))
        total = sum(len(r) for r in outs[1])
        first = [next((i for i, (a, b) in enumerate(zip(r1, r2)) if a != b), None)
                 for r1, r2 in zip(outs[1], outs[2])]  # fmt: skip
        report[kv] = {"identical_frac": same / total, "first_divergence": first,
                      "pass": same / total >= 0.9}  # fmt: skip
        print(kv, report[kv], flush=True)
    json.dump(report, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
