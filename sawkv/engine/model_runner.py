"""Model runner: owns the model, the page pool, per-step input preparation and CUDA graphs.

Per step it builds one :class:`StepContext` on the host (slot mapping, block tables, sequence
lengths, query start offsets), copies it to the device once, runs the model, and returns fp32
logits of the last token of every sequence that has reached its end. Pure-decode steps on CUDA
replay a captured graph for the smallest captured batch size >= the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from sawkv.attention.backend import DECODE_MAX_QUERY, StepContext, get_backend
from sawkv.cache.kv_cache import KVCacheSpec, allocate_kv_cache
from sawkv.config import EngineConfig, ModelConfig
from sawkv.engine.cuda_graph import DecodeGraphs
from sawkv.engine.scheduler import ScheduledBatch
from sawkv.models.layers import use_compiled_ops
from sawkv.models.loader import build_model


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        model_dir,
        spec: KVCacheSpec,
        max_model_len: int,
        key_means: torch.Tensor | None,
    ) -> None:
        self.config, self.model_config, self.spec = config, model_config, spec
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // spec.block_size)
        self.backends = self._make_backends(spec)
        self.backend = self.backends[0]  # handed to the model; _bind sets each layer's own
        self.model = self._build_model(model_config, model_dir)
        if self.device.type == "cuda" and config.enable_compile and not config.enforce_eager:
            use_compiled_ops(self.model)
        self.key_means = key_means
        self.num_blocks = self._decide_num_blocks()
        self.kv = allocate_kv_cache(
            spec,
            self.num_blocks,
            self.device,
            key_means,
            [model_config.layer_window(i) for i in range(model_config.num_layers)],
        )
        self._bind(self.kv)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self, config.scheduler.max_num_seqs)

    def _build_model(self, model_config: ModelConfig, model_dir):
        """The model on this runner's device (tensor parallelism overrides it with a shard)."""
        return build_model(
            model_config,
            model_dir,
            self.backend,
            dtype=self.dtype,
            device=self.device,
            max_len=self.max_model_len,
            seed=self.config.seed,
        )

    def _make_backends(self, spec: KVCacheSpec) -> list:
        """One attention backend per layer, built for that layer's page format (a recipe mixes
        formats); layers of equal format share an instance."""
        by_format: dict[tuple, object] = {}
        out = []
        for i in range(spec.num_layers):
            args = spec.backend_args(i)
            key = tuple(sorted(args.items()))
            if key not in by_format:
                by_format[key] = get_backend(self.config.attention_backend, self.device, **args)
            out.append(by_format[key])
        return out

    # ---- memory ---------------------------------------------------------------------------
    def _bind(self, kv) -> None:
        for layer in self.model.layers:
            idx = layer.self_attn.layer_idx
            layer.self_attn.kv = kv[idx]
            layer.self_attn.backend = self.backends[idx]

    def _decide_num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_gpu_blocks is not None:
            return cc.num_gpu_blocks
        if cc.kv_cache_memory_bytes is not None:
            return max(1, self.spec.num_blocks_for(cc.kv_cache_memory_bytes))
        if self.device.type != "cuda":
            return max(1, self.spec.num_blocks_for(cc.cpu_kv_cache_bytes))
        peak = self._profile_peak_memory()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free = int(total * cc.gpu_memory_utilization) - peak
        if free < self.spec.bytes_per_block:
            raise ValueError(
                f"no GPU memory left for the KV cache: model and activations take "
                f"{peak / 2**30:.1f} "
                f"GiB of {total * cc.gpu_memory_utilization / 2**30:.1f} GiB allowed "
                f"(gpu_memory_utilization={cc.gpu_memory_utilization})"
            )
        return self.spec.num_blocks_for(free)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes of a warm-up prefill of ``max_num_batched_tokens`` tokens (scratch pool)."""
        n = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        blocks = -(-n // self.spec.block_size)
        scratch = allocate_kv_cache(
            self.spec,
            blocks,
            self.device,
            self.key_means,
            [self.model_config.layer_window(i) for i in range(self.model_config.num_layers)],
        )
        scratch_bytes = blocks * self.spec.bytes_per_block
        self._bind(scratch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        pos = list(range(n))
        ctx = self._context([pos], [list(range(blocks))], [n], [0, n], is_decode=False)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), ctx)
        self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs) :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        del scratch, ctx, hidden
        torch.cuda.empty_cache()
        return peak

    # ---- per step -------------------------------------------------------------------------
    def _context(self, positions, block_tables, seq_lens, qsl, *, is_decode):
        """Host lists -> one :class:`StepContext` on the device."""
        bs = self.spec.block_size
        slots = []
        for pos, table in zip(positions, block_tables):
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
        width = max(len(t) for t in block_tables)
        padded = np.zeros((len(block_tables), width), dtype=np.int32)
        for row, table in zip(padded, block_tables):
            row[: len(table)] = table
        dev = self.device
        ctx = StepContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(padded).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            is_decode=is_decode,
            max_seq_len=max(seq_lens),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
        )
        q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
        d = next((i for i, n in enumerate(q_lens) if n > DECODE_MAX_QUERY), len(q_lens))
        if not is_decode and d:
            ctx.decode_part, ctx.extend_part = self._split(ctx, d, padded, seq_lens, qsl)
        return ctx

    def _split(self, ctx: StepContext, d: int, padded, seq_lens: list[int], qsl: list[int]):
        """Sub-contexts of a mixed step. Sequences [0, d) have at most DECODE_MAX_QUERY new
        tokens each: every such token becomes one decode row (its sequence's block table, the
        causal length up to itself), so they get the split-K decode kernel instead of an extend
        program walking a long context alone. The rest go to the extend kernel."""
        rows, lens = [], []
        for s in range(d):
            n, q_len = seq_lens[s], qsl[s + 1] - qsl[s]
            rows.extend([s] * q_len)
            lens.extend(range(n - q_len + 1, n + 1))
        num_rows, dev = len(rows), self.device
        decode = StepContext(
            ctx.slot_mapping[:num_rows],
            torch.from_numpy(padded[rows]).to(dev, non_blocking=True),
            torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True),
            torch.arange(num_rows + 1, dtype=torch.int32, device=dev),
            True, max(lens), 1,
        )  # fmt: skip
        if d == len(seq_lens):
            return decode, None
        extend = StepContext(
            ctx.slot_mapping[num_rows:], ctx.block_tables[d:], ctx.seq_lens[d:],
            ctx.query_start_loc[d:] - num_rows, False, max(seq_lens[d:]),
            max(b - a for a, b in zip(qsl[d:], qsl[d + 1 :])),
        )  # fmt: skip
        return decode, extend

    def prepare(self, batch: ScheduledBatch):
        """-> (input_ids, positions, ctx, logits_indices, sampled seq indices)."""
        ids, positions, seq_lens, qsl, tables = [], [], [], [0], []
        logits_idx, sample_seqs = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.append(range(start, start + n))
            seq_lens.append(start + n)
            qsl.append(qsl[-1] + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                logits_idx.append(qsl[-1] - 1)
                sample_seqs.append(i)
        ctx = self._context(positions, tables, seq_lens, qsl, is_decode=batch.is_decode)
        flat_pos = [p for r in positions for p in r]
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(flat_pos, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, pos, ctx, logits_idx, sample_seqs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Run one step. Returns (logits ``[n_sample, vocab]`` fp32 or None, indices into
        ``batch.seqs`` of the sequences those rows belong to)."""
        if self.graphs is not None and batch.is_decode and self.graphs.can_run(len(batch)):
            return self.graphs.run(batch), list(range(len(batch)))
        input_ids, positions, ctx, logits_idx, sample_seqs = self.prepare(batch)
        hidden = self.model(input_ids, positions, ctx)
        if not sample_seqs:
            return None, []
        idx = torch.tensor(logits_idx, device=self.device)
        return self.model.compute_logits(hidden[idx]), sample_seqs
