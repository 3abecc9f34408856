"""lm-eval adapter on a local-JSON multiple-choice task (hub datasets are unreachable here).

The accuracy lm-eval reports through ``--model sawkv`` must equal the accuracy computed
independently from :func:`sawkv.eval.tasks.loglik_batch` on the same items and KV method.
Skipped where lm-eval is not installed (it is not a sawkv dependency).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sawkv.models import resolve_model_dir

lm_eval = pytest.importorskip("lm_eval")

ITEMS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"],
     "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "apple", "potato"], "label": 1},
    {"question": "What do bees make?", "choices": ["milk", "honey", "silk", "wax"], "label": 1},
]  # fmt: skip

YAML = """task: sawkv_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    except (ValueError, OSError) as e:
        pytest.skip(f"SmolLM2 tokenizer not installed: {e}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512)  # fmt: skip
    d = tmp_path_factory.mktemp("tinyllama_lmeval")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("kv_method", ["int4", "kivi2-g8-r8"])
def test_local_json_task_matches_own_scoring(local_model, tmp_path, kv_method):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import sawkv.eval.lm_eval_adapter  # noqa: F401  registers --model sawkv
    from sawkv.eval.tasks import encode_pair, loglik_batch
    from sawkv.models.hub import load_hf_model

    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in ITEMS))
    (tmp_path / "task.yaml").write_text(YAML.format(path=data))
    out = simple_evaluate(
        model="sawkv", model_args=f"pretrained={local_model},kv_method={kv_method}",
        tasks=["sawkv_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
    )  # fmt: skip
    acc = out["results"]["sawkv_local_mc"]["acc,none"]

    model, tok = load_hf_model(local_model)
    hits = []
    for it in ITEMS:
        ctx = f"Question: {it['question']}\nAnswer:"
        ll = [loglik_batch(model, [encode_pair(tok, ctx, f" {c}")], kv_method)[0]
              for c in it["choices"]]  # fmt: skip
        hits.append(int(max(range(len(ll)), key=ll.__getitem__) == it["label"]))
    assert acc == pytest.approx(sum(hits) / len(hits))
