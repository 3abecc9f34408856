"""lm-evaluation-harness model adapter: ``--model sawkv``, K/V read through a sawkv method.

Run lm-eval through this module so the model type is registered before lm-eval parses its
arguments (lm-eval has no plug-in hook for model classes)::

    python -m sawkv.eval.lm_eval_adapter --model sawkv \\
        --model_args pretrained=smollm2-135m,kv_method=int4-bdr64-kc \\
        --tasks my_task --include_path path/to/tasks --limit 20

``pretrained`` is a sawkv model name or any local HF model directory; ``kv_method`` any name of
the method registry (baselines included: calibrated on first use, see
:mod:`sawkv.eval.artifacts`). Every request is scored with a fresh cache of that method, prefill
included (as the rest of the harness). Requests run one sequence at a time: this is a
correctness path for CPU evaluation, not a fast one.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from sawkv.eval.sim_cache import build_cache
from sawkv.eval.tasks import encode_pair, prefix_ids
from sawkv.hf.cache import cache_kwargs


@register_model("sawkv")
class SawKVLM(LM):
    """lm-eval ``LM`` whose attention reads K/V through a sawkv KV method.

    Args:
        pretrained: model name (``smollm2-135m`` ...) or local HF directory.
        kv_method: method name, e.g. ``auto``, ``int4-bdr64-kc``, ``kivi2``.
        device: torch device.
        max_length: context limit (left-truncation of long requests).
    """

    def __init__(self, pretrained: str, kv_method: str = "auto", device: str = "cpu",
                 max_length: int = 4096, **kwargs):  # fmt: skip
        super().__init__()
        from sawkv.eval.artifacts import prepare_method
        from sawkv.eval.calibrate import get_key_means
        from sawkv.eval.study import resolve_method
        from sawkv.models.hub import load_hf_model

        self.model, self.tokenizer = load_hf_model(pretrained, device=device)
        method = resolve_method(kv_method, self.model.config)
        needs_mu = getattr(method, "center_k", False)  # key means only for -kc style methods
        self.k_means = get_key_means(self.model, self.tokenizer, pretrained) if needs_mu else None
        self.method = prepare_method(method, self.model, self.tokenizer, pretrained, self.k_means)
        self.max_length = int(max_length)
        self._device = torch.device(device)

    # ---- helpers --------------------------------------------------------------------------
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probs ``[len(ids), vocab]`` of the next token at each position."""
        x = torch.tensor([ids[-self.max_length :]], device=self._device)
        cache = build_cache(self.model, self.method, self.k_means)
        with torch.no_grad():
            logits = self.model(x, **cache_kwargs(self.model, cache), use_cache=True).logits[0]
        return F.log_softmax(logits.float(), -1)

    def _score(self, ids: list[int], n: int) -> tuple[float, bool]:
        ids = ids[-self.max_length :]
        lp = self._logprobs(ids)
        tgt = torch.tensor(ids[len(ids) - n :], device=self._device)
        pred = lp[len(ids) - n - 1 : len(ids) - 1]
        ll = pred.gather(-1, tgt[:, None]).sum().item()
        return ll, bool((pred.argmax(-1) == tgt).all())

    # ---- lm-eval API ----------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(context, continuation)`` -> (summed log-likelihood, is the greedy continuation)."""
        out = []
        for req in requests:
            context, continuation = req.args
            out.append(self._score(*encode_pair(self.tokenizer, context, continuation)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood, one window of ``max_length`` tokens at a time."""
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            pre = prefix_ids(self.tokenizer) or [self.tokenizer.eos_token_id]
            total, step = 0.0, self.max_length - len(pre)
            for s in range(0, len(ids), step):
                chunk = ids[s : s + step]
                total += self._score(pre + chunk, len(chunk))[0]
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy generation until a stop string or ``max_gen_toks``."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = prefix_ids(self.tokenizer) + self.tokenizer(
                context, add_special_tokens=False)["input_ids"]  # fmt: skip
            x = torch.tensor([ids[-(self.max_length - max_new) :]], device=self._device)
            gen = self.model.generate(
                x, **cache_kwargs(self.model, build_cache(self.model, self.method, self.k_means)),
                max_new_tokens=max_new, do_sample=False,
                stop_strings=until or None, tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )  # fmt: skip
            text = self.tokenizer.decode(gen[0, x.shape[1] :], skip_special_tokens=True)
            for stop in until:  # cut at the first stop string, as lm-eval expects
                text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """``lm_eval`` command line with the ``sawkv`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
