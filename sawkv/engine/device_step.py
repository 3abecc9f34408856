"""The device side of a step: the block-table tensor and the upload of :class:`StepInputs`.

Every rank holds one :class:`BlockTable` ``[max_num_seqs, max_blocks_per_seq]`` int32 and
applies the step's edits to it; :func:`upload` then copies the step's arrays in two host-to-
device transfers (one int64, one int32 buffer, pinned on CUDA) and builds the
:class:`StepContext` every layer reads. A mixed step gets a decode sub-context (one row per
token of the leading few-token sequences, with its causal length) and an extend sub-context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sawkv.attention.backend import StepContext
from sawkv.engine.step_inputs import StepInputs


class BlockTable:
    """Page ids of the scheduled sequences, one row each: ``table[row, i]`` is the page of
    positions ``[i * block_size, (i + 1) * block_size)``. Entries past a sequence's length are
    stale and never read (``seq_lens`` bound every kernel)."""

    def __init__(self, num_rows: int, num_cols: int, device: torch.device) -> None:
        self.num_rows, self.num_cols = num_rows, num_cols
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32, device=device)

    def apply(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values [n]`` int32 at flat positions ``index [n]`` int64."""
        if index.numel():
            self.table.view(-1).index_copy_(0, index, values)

    def gather(self, rows: torch.Tensor, num_cols: int) -> torch.Tensor:
        """``[len(rows), num_cols]`` int32: the leading columns of the given rows."""
        return self.table[:, :num_cols].index_select(0, rows)


@dataclass
class DeviceStep:
    """One step on the device: model inputs ``[num_tokens]`` int64, the attention context and
    the token rows to take logits from ``[num_sampled]`` int64."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: StepContext
    logits_indices: torch.Tensor


def _decode_rows(inputs: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the mixed step's decode part: sequence ``s < num_decode_seqs`` with ``q`` new
    tokens gives ``q`` rows, each with the causal length up to its own token."""
    d = inputs.num_decode_seqs
    q_lens = np.diff(inputs.query_start_loc[: d + 1])
    seqs = np.repeat(np.arange(d, dtype=np.int32), q_lens)
    offset = np.arange(len(seqs), dtype=np.int32) - np.repeat(inputs.query_start_loc[:d], q_lens)
    lens = inputs.seq_lens[seqs] - np.repeat(q_lens, q_lens) + offset + 1
    return seqs, lens.astype(np.int32)


def _to_device(parts: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """One transfer for several small arrays; returns views of the device buffer."""
    host = torch.from_numpy(np.concatenate([p.astype(dtype, copy=False) for p in parts]))
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)
    return list(torch.split(buf, [len(p) for p in parts]))


def sink_writes(
    slot_mapping: np.ndarray, block_size: int, num_first_blocks: int, num_sink: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token rows, flat sink indices) of the step's tokens that are attention sinks: position
    < ``num_sink`` of a first page (pages ``< num_first_blocks``; a first page holds positions
    ``0 .. block_size - 1``, so the in-page offset is the position). ``[n]`` int64 each."""
    page, off = slot_mapping // block_size, slot_mapping % block_size
    sel = (slot_mapping >= 0) & (page < num_first_blocks) & (off < num_sink)
    src = np.flatnonzero(sel).astype(np.int64)
    return src, (page[sel] * num_sink + off[sel]).astype(np.int64)


def upload(
    inputs: StepInputs,
    block_table: BlockTable,
    block_size: int,
    feed_tokens: torch.Tensor | None = None,
    sink_layout: tuple[int, int] | None = None,
) -> DeviceStep:
    """Apply the step's block-table edits and put its inputs on the device. ``feed_tokens``
    (``[n]`` int64 on the device, the previous step's samples) fill the placeholder input ids
    (``inputs.feed_index``) without a round trip through the host. ``sink_layout``
    ``(num_first_blocks, num_sink)``: the layers keep attention sinks (:func:`sink_writes`)."""
    dev = block_table.table.device
    mixed = not inputs.is_decode and inputs.num_decode_seqs > 0
    rows, lens = _decode_rows(inputs) if mixed else (np.zeros(0, np.int32),) * 2
    empty = np.zeros(0, np.int64)
    s_src, s_dst = empty, empty
    if sink_layout is not None:
        s_src, s_dst = sink_writes(inputs.slot_mapping, block_size, *sink_layout)
    ids, pos, slots, logits_idx, t_index, f_index, f_src, sink_src, sink_dst = _to_device(
        [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.logits_indices,
         inputs.table_index, inputs.feed_index, inputs.feed_src, s_src, s_dst], np.int64, dev,
    )  # fmt: skip
    if len(inputs.feed_index):
        if feed_tokens is None:
            raise RuntimeError("the step has placeholder input ids but no sampled tokens to feed")
        ids[f_index] = feed_tokens[f_src]
    seq_lens, qsl, t_rows, t_values, d_rows, d_lens = _to_device(
        [inputs.seq_lens, inputs.query_start_loc, inputs.table_rows, inputs.table_values,
         rows, lens], np.int32, dev,
    )  # fmt: skip
    block_table.apply(t_index, t_values)
    num_cols = -(-inputs.max_seq_len // block_size)
    tables = block_table.gather(t_rows, num_cols)
    ctx = StepContext(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=seq_lens,
        query_start_loc=qsl,
        is_decode=inputs.is_decode,
        max_seq_len=inputs.max_seq_len,
        max_query_len=inputs.max_query_len,
    )
    if len(s_src):
        ctx.sink_src, ctx.sink_dst = sink_src, sink_dst
    if not inputs.is_decode:  # host lengths for the extend path, without reading the device
        ctx.seq_lens_host = inputs.seq_lens.tolist()
        ctx.query_start_loc_host = inputs.query_start_loc.tolist()
    if mixed:
        ctx.decode_part, ctx.extend_part = _split(inputs, ctx, tables, d_rows, d_lens)
    return DeviceStep(ids, pos, ctx, logits_idx)


def _split(inputs: StepInputs, ctx: StepContext, tables, d_rows, d_lens):
    """(decode part, extend part or None) of a mixed step."""
    d, num_rows = inputs.num_decode_seqs, len(d_rows)
    qsl = inputs.query_start_loc
    decode = StepContext(
        slot_mapping=ctx.slot_mapping[:num_rows],
        block_tables=tables.index_select(0, d_rows),
        seq_lens=d_lens,
        query_start_loc=torch.arange(num_rows + 1, dtype=torch.int32, device=d_rows.device),
        is_decode=True,
        max_seq_len=int(inputs.seq_lens[:d].max()),
        max_query_len=1,
    )
    if d == inputs.num_seqs:
        return decode, None
    extend = StepContext(
        slot_mapping=ctx.slot_mapping[num_rows:],
        block_tables=tables[d:],
        seq_lens=ctx.seq_lens[d:],
        query_start_loc=ctx.query_start_loc[d:] - num_rows,
        is_decode=False,
        max_seq_len=int(inputs.seq_lens[d:].max()),
        max_query_len=int(np.diff(qsl[d:]).max()),
        seq_lens_host=inputs.seq_lens[d:].tolist(),
        query_start_loc_host=(qsl[d:] - num_rows).tolist(),
    )
    return decode, extend
