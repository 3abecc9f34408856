"""Model runner: owns the model, the page pool, the device block table and CUDA graphs.

A step is planned once on the host (:meth:`ModelRunner.plan` -> :class:`StepInputs`, rank 0
only) and executed on every rank (:meth:`ModelRunner.execute`): upload the inputs, apply the
block-table edits, run the model eagerly or replay a decode graph with the same inputs, and
return fp32 logits of the last token of every sequence that reached its end. Under tensor
parallelism :meth:`call` makes rank 0 broadcast ``(method, args)`` first
(:mod:`sawkv.distributed.runner`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from sawkv.attention.registry import get_backend
from sawkv.cache.kv_cache import KVCacheSpec, allocate_kv_cache
from sawkv.config import EngineConfig, ModelConfig
from sawkv.engine.cuda_graph import DecodeGraphs
from sawkv.engine.device_step import BlockTable, DeviceStep, upload
from sawkv.engine.scheduler import ScheduledBatch
from sawkv.engine.step_inputs import StepInputs, StepPlanner, reorder_batch
from sawkv.models.layers import set_key_smoothing, use_batch_invariant_ops, use_compiled_ops
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
        # one row per sequence of a step; rank 0 plans, every rank applies the edits
        num_rows = config.scheduler.max_num_seqs
        self.block_table = BlockTable(num_rows, self.max_blocks_per_seq, self.device)
        # one backend for every layer: each layer's pages carry their own format
        self.backend = get_backend(config.attention_backend, self.device)
        self.planner = self._make_planner(num_rows)
        self.model = self._build_model(model_config, model_dir)
        k_scale = getattr(spec.method, "k_scale", None)  # a saw-int4 recipe's key smoothing
        if k_scale is not None:
            set_key_smoothing(self.model, self._local_kv_heads(k_scale))
        if self.device.type == "cuda" and config.enable_compile and not config.enforce_eager:
            use_compiled_ops(self.model)
        if config.is_batch_invariant:
            use_batch_invariant_ops(self.model)
        self.key_means = key_means
        self.layer_windows = [model_config.layer_window(i) for i in range(model_config.num_layers)]
        # attention sinks (a recipe's): one exact row per first page, first pages drawn from
        # pages 0 .. num_first_blocks - 1 (BlockManager), one per schedulable sequence
        self.num_first_blocks = config.scheduler.max_num_seqs if spec.num_sink else 0
        self.num_blocks = self._decide_num_blocks()
        self.kv = allocate_kv_cache(
            spec, self.num_blocks, self.device, key_means, self.layer_windows,
            self.num_first_blocks,
        )  # fmt: skip
        self._bind(self.kv)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self, config.scheduler.max_num_seqs)

    def _local_kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[num_layers, num_kv_heads, ...]`` -> the KV heads this runner holds (all)."""
        return t

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

    def _make_planner(self, num_rows: int) -> StepPlanner:
        return StepPlanner(num_rows, self.max_blocks_per_seq, self.spec.block_size,
                           decode_threshold=self.backend.reorder_batch_threshold)  # fmt: skip

    # ---- memory ---------------------------------------------------------------------------
    def _bind(self, kv) -> None:
        for layer in self.model.layers:
            idx = layer.self_attn.layer_idx
            layer.self_attn.kv = kv[idx]

    def _decide_num_blocks(self) -> int:
        """Pages of the pool; with sinks also fixes ``num_first_blocks``."""
        cc = self.config.cache
        if cc.num_gpu_blocks is not None:
            self.num_first_blocks = min(self.num_first_blocks, cc.num_gpu_blocks // 4)
            return cc.num_gpu_blocks
        if cc.kv_cache_memory_bytes is not None:
            return max(1, self._blocks_and_sinks(cc.kv_cache_memory_bytes))
        if self.device.type != "cuda":
            return max(1, self._blocks_and_sinks(cc.cpu_kv_cache_bytes))
        peak = self._profile_peak_memory()
        total = torch.cuda.get_device_properties(self.device).total_memory
        blocks = self._blocks_and_sinks(int(total * cc.gpu_memory_utilization) - peak)
        if blocks < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: model and activations take "
                f"{peak / 2**30:.1f} "
                f"GiB of {total * cc.gpu_memory_utilization / 2**30:.1f} GiB allowed "
                f"(gpu_memory_utilization={cc.gpu_memory_utilization})"
            )
        return blocks

    def _blocks_and_sinks(self, memory: int) -> int:
        """Pages that fit ``memory`` bytes beside the sink stores, whose size (one row per
        first page) is capped so that first pages are at most a quarter of the pool."""
        if self.num_first_blocks:
            per_first = self.spec.sink_bytes(1)
            cap = max(0, memory) // (4 * self.spec.bytes_per_block + per_first)
            self.num_first_blocks = min(self.num_first_blocks, cap)
        sinks = self.spec.sink_bytes(self.num_first_blocks)
        return self.spec.num_blocks_for(memory - sinks)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes of a warm-up prefill of ``max_num_batched_tokens`` tokens (scratch pool)."""
        n = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        blocks = -(-n // self.spec.block_size)
        first = min(self.num_first_blocks, blocks)
        scratch = allocate_kv_cache(
            self.spec, blocks, self.device, self.key_means, self.layer_windows, first
        )
        scratch_bytes = blocks * self.spec.bytes_per_block
        scratch_bytes += self.spec.sink_bytes(first)
        self._bind(scratch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq = SimpleNamespace(request_id="profile", token_ids=[0] * n, num_tokens=n,
                              num_computed_tokens=0, block_table=list(range(blocks)))  # fmt: skip
        planner = self._make_planner(1)
        step = self.upload(planner.plan([seq], [n]))
        hidden = self.model(step.input_ids, step.positions, step.ctx)
        self.model.compute_logits(hidden[-min(n, self.config.scheduler.max_num_seqs) :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        del scratch, step, hidden
        torch.cuda.empty_cache()
        return peak

    def close(self) -> None:
        """Drop this runner's GPU state (CUDA graphs, pages, weights) so another engine in the
        same process can size its cache; the graphs hold a reference back to the runner, so
        without this the memory waits for the cycle collector. Idempotent; the runner is
        unusable afterwards."""
        self.graphs = None
        self.kv = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    # ---- per step -------------------------------------------------------------------------
    def call(self, method: str, *args):
        """Run ``method`` on this runner (tensor parallelism runs it on every rank)."""
        return getattr(self, method)(*args)

    def plan(self, batch: ScheduledBatch, pending_rows: dict[str, int] | None = None) -> StepInputs:
        """Host side of a step (rank 0 only): the batch as :class:`StepInputs`.

        Sequences with few new tokens go first (the backend's ``reorder_batch_threshold``), so
        a mixed step's decode rows are one leading block; ``sampled_seqs`` still index
        ``batch.seqs``. ``pending_rows``: see :meth:`StepPlanner.plan` (async scheduling)."""
        order = reorder_batch(batch.num_new_tokens, self.backend.reorder_batch_threshold)
        if order is None:
            return self.planner.plan(batch.seqs, batch.num_new_tokens, pending_rows)
        seqs = [batch.seqs[i] for i in order]
        inputs = self.planner.plan(seqs, [batch.num_new_tokens[i] for i in order], pending_rows)
        inputs.sampled_seqs = np.asarray(order, dtype=np.int64)[inputs.sampled_seqs]
        return inputs

    def upload(self, inputs: StepInputs, feed_tokens: torch.Tensor | None = None) -> DeviceStep:
        """Apply the step's block-table edits, put its inputs on the device (``feed_tokens``:
        the previous step's samples, async scheduling) and let the attention backend plan the
        step once for all layers."""
        sink_layout = None
        if self.num_first_blocks:
            sink_layout = (self.num_first_blocks, self.spec.num_sink)
        step = upload(inputs, self.block_table, self.spec.block_size, feed_tokens, sink_layout)
        self.backend.plan(step.ctx)
        return step

    @torch.inference_mode()
    def execute(
        self, inputs: StepInputs, feed_tokens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Run one planned step on this rank -> fp32 logits ``[num_sampled, vocab]`` (None if
        no sequence reaches its end). Pure-decode steps replay a CUDA graph when one fits;
        the graph copies the same :class:`DeviceStep` into its static buffers.
        ``feed_tokens``: the previous step's samples on the device (async scheduling)."""
        step = self.upload(inputs, feed_tokens)
        # graphs capture no sink writes: a decode step that writes a sink (a sequence's first
        # few tokens) runs eagerly
        graph_ok = step.ctx.is_decode and step.ctx.sink_dst is None
        if self.graphs is not None and graph_ok and self.graphs.can_run(inputs.num_seqs):
            hidden = self.graphs.run(step.input_ids, step.positions, step.ctx)
        else:
            hidden = self.model(step.input_ids, step.positions, step.ctx)
        if not len(inputs.logits_indices):
            return None
        return self.model.compute_logits(hidden[step.logits_indices])

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Plan and run one step on every rank. Returns (logits ``[n_sample, vocab]`` fp32 or
        None, indices into ``batch.seqs`` of the sequences those rows belong to)."""
        inputs = self.plan(batch)
        return self.call("execute", inputs), inputs.sampled_seqs.tolist()

    def prepare(self, batch: ScheduledBatch):
        """-> (input_ids, positions, ctx, logits_indices, sampled seq indices) on the device,
        for running ``self.model`` directly (teacher-forced scoring in tests)."""
        inputs = self.plan(batch)
        step = self.upload(inputs)
        return (step.input_ids, step.positions, step.ctx, inputs.logits_indices.tolist(),
                inputs.sampled_seqs.tolist())  # fmt: skip
