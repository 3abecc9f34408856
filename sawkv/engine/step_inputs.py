"""One step's inputs, planned once on the host: :class:`StepInputs` and the :class:`StepPlanner`.

The planner turns a scheduled batch into flat numpy arrays (token ids, positions, slot
mapping, lengths, logits indices) plus the edits that bring the device block table up to date.
Eager runs, CUDA-graph replay and every tensor-parallel rank consume the same object; nothing
downstream reads a :class:`Sequence`. Length diagram of sequence ``s`` (as in
:mod:`sawkv.attention.backend`)::

    positions 0 ........... seq_lens[s]-q_len ........... seq_lens[s]-1
              |<-- cached -->|<-- q_len new tokens: input_ids[qsl[s]:qsl[s+1]] -->|
    q_len = query_start_loc[s+1] - query_start_loc[s]

Block tables live on the device (:class:`BlockTable`), one row per scheduled sequence. A
sequence keeps its row from one step to the next while it is scheduled, so a step only sends
the pages added since the last step (one per ``block_size`` decode steps); a sequence absent
from a step gives its row back and is sent whole when it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A sampled token whose value is still on the device (async scheduling): it stands in the
# sequence's token list until the engine reads the step's samples back.
PLACEHOLDER = -1


@dataclass
class StepInputs:
    """The plan of one step (host numpy arrays; picklable, broadcast as is under TP).

    input_ids, positions, slot_mapping: ``[num_tokens]`` int64 (slot -1: not written).
    seq_lens: ``[num_seqs]`` int32, new tokens included; query_start_loc ``[num_seqs + 1]``
    int32. table_rows: ``[num_seqs]`` int32, each sequence's row of the device block table.
    table_index / table_values: ``[num_edits]`` int64 flat indices into the block table
    (``row * num_cols + col``) and the int32 page ids to write there before the step.
    logits_indices: ``[num_sampled]`` int64, the token rows whose next-token logits are
    needed (last token of each sequence that reaches its end this step); sampled_seqs
    ``[num_sampled]`` int64, the batch index of the sequence each of those rows belongs to.
    num_decode_seqs: leading sequences with at most ``decode_threshold`` new tokens (the
    runner puts them first, :func:`reorder_batch`; their tokens go to the decode kernel in a
    mixed step).
    feed_index / feed_src: ``[num_fed]`` int64, async scheduling only: token rows whose input id
    is still a placeholder (:data:`PLACEHOLDER`) and the row of the previous step's sampled
    tokens that holds it; the device fills them in before the forward.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    table_rows: np.ndarray
    table_index: np.ndarray
    table_values: np.ndarray
    logits_indices: np.ndarray
    sampled_seqs: np.ndarray
    num_decode_seqs: int
    max_seq_len: int
    max_query_len: int
    feed_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    feed_src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token (decode kernels, CUDA graphs)."""
        return self.num_tokens == self.num_seqs

    @property
    def kind(self) -> str:
        """``decode`` (one token each), ``prefill`` (no single-token sequence) or ``mixed``."""
        if self.is_decode:
            return "decode"
        q_lens = np.diff(self.query_start_loc)
        return "mixed" if (q_lens == 1).any() else "prefill"


class _Row:
    __slots__ = ("row", "table", "num_sent")

    def __init__(self, row: int, table: list[int]) -> None:
        self.row, self.table, self.num_sent = row, table, 0


class StepPlanner:
    """Rank 0's host planner: scheduled batch -> :class:`StepInputs`.

    Keeps which block-table row each scheduled sequence owns and how many of its page ids the
    device row already holds. A sequence's ``block_table`` list only grows while it runs
    (freeing replaces the list), so a row is valid while it mirrors the same list object.
    """

    def __init__(self, num_rows: int, num_cols: int, block_size: int, *, decode_threshold: int):
        self.num_rows, self.num_cols, self.block_size = num_rows, num_cols, block_size
        # the attention backend's reorder_batch_threshold: how many new tokens a sequence may
        # have and still run in the decode kernel
        self.decode_threshold = decode_threshold
        self._rows: dict[str, _Row] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def _assign_rows(self, seqs) -> list[_Row]:
        scheduled = {s.request_id for s in seqs}
        for rid in [r for r in self._rows if r not in scheduled]:
            self._free.append(self._rows.pop(rid).row)
        out = []
        for seq in seqs:
            state = self._rows.get(seq.request_id)
            if state is None:
                if not self._free:
                    raise RuntimeError(f"more than {self.num_rows} sequences in one step")
                state = self._rows[seq.request_id] = _Row(self._free.pop(), seq.block_table)
            elif state.table is not seq.block_table or state.num_sent > len(seq.block_table):
                state.table, state.num_sent = seq.block_table, 0  # freed and re-allocated
            out.append(state)
        return out

    def _table_edits(self, rows: list[_Row]) -> tuple[np.ndarray, np.ndarray]:
        index, values = [], []
        for state in rows:
            new = state.table[state.num_sent :]
            if new:
                start = state.row * self.num_cols + state.num_sent
                index.append(np.arange(start, start + len(new), dtype=np.int64))
                values.append(np.asarray(new, dtype=np.int32))
                state.num_sent = len(state.table)
        if not index:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(index), np.concatenate(values)

    def plan(
        self, seqs, num_new_tokens: list[int], pending_rows: dict[str, int] | None = None
    ) -> StepInputs:
        """Plan ``num_new_tokens[i]`` tokens of ``seqs[i]`` from its ``num_computed_tokens``.

        ``seqs`` are :class:`sawkv.engine.sequence.Sequence` (``request_id``, ``token_ids``,
        ``num_computed_tokens``, ``block_table`` with pages for every new token).
        ``pending_rows``: request id -> row of the previous step's sampled tokens, for
        sequences whose newest token is a :data:`PLACEHOLDER` (async scheduling)."""
        rows = self._assign_rows(seqs)
        index, values = self._table_edits(rows)
        q_lens = np.asarray(num_new_tokens, dtype=np.int32)
        starts = np.asarray([s.num_computed_tokens for s in seqs], dtype=np.int64)
        seq_lens = (starts + q_lens).astype(np.int32)
        qsl = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        if (q_lens == 1).all():  # decode: one token each, no per-sequence slicing
            input_ids = np.fromiter((s.token_ids[-1] for s in seqs), np.int64, len(seqs))
            positions = starts
        else:
            input_ids = np.concatenate(
                [np.asarray(s.token_ids[a : a + n], np.int64)
                 for s, a, n in zip(seqs, starts.tolist(), num_new_tokens)]
            )  # fmt: skip
            positions = np.arange(qsl[-1], dtype=np.int64) - np.repeat(qsl[:-1] - starts, q_lens)
        slot_mapping = self._slots(seqs, positions, q_lens)
        feed_index = np.flatnonzero(input_ids == PLACEHOLDER).astype(np.int64)
        feed_src = np.zeros(len(feed_index), np.int64)
        if len(feed_index):
            owner = np.searchsorted(qsl[1:], feed_index, side="right")
            try:
                feed_src[:] = [pending_rows[seqs[i].request_id] for i in owner.tolist()]
            except (KeyError, TypeError):
                raise RuntimeError("a placeholder token has no pending sample to take") from None
        num_tokens = np.fromiter((s.num_tokens for s in seqs), np.int64, len(seqs))
        reach_end = seq_lens == num_tokens
        small = q_lens <= self.decode_threshold
        num_decode = len(seqs) if small.all() else int(np.argmin(small))
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            seq_lens=seq_lens,
            query_start_loc=qsl,
            table_rows=np.asarray([r.row for r in rows], dtype=np.int32),
            table_index=index,
            table_values=values,
            logits_indices=(qsl[1:][reach_end] - 1).astype(np.int64),
            sampled_seqs=np.flatnonzero(reach_end).astype(np.int64),
            num_decode_seqs=num_decode,
            max_seq_len=int(seq_lens.max()),
            max_query_len=int(q_lens.max()),
            feed_index=feed_index,
            feed_src=feed_src,
        )

    def _slots(self, seqs, positions: np.ndarray, q_lens: np.ndarray) -> np.ndarray:
        bs = self.block_size
        if len(positions) == len(seqs):  # decode: one position per sequence
            pages = np.fromiter(
                (s.block_table[p // bs] for s, p in zip(seqs, positions.tolist())),
                np.int64,
                len(seqs),
            )
        else:
            runs = np.split(positions, np.cumsum(q_lens)[:-1])
            pages = np.concatenate([_pages(s.block_table, p, bs) for s, p in zip(seqs, runs)])
        return pages * bs + positions % bs


def _pages(table: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    """Page ids holding ``positions`` of one sequence (a contiguous run of positions)."""
    first, last = int(positions[0]) // block_size, int(positions[-1]) // block_size
    run = np.asarray(table[first : last + 1], dtype=np.int64)
    return run[positions // block_size - first]


def reorder_batch(num_new_tokens: list[int], threshold: int) -> list[int] | None:
    """Order that puts sequences with at most ``threshold`` new tokens first (stable), or None
    if they already are: the decode kernel then takes one leading block of the step."""
    small = [n <= threshold for n in num_new_tokens]
    if all(small[i] or not small[i + 1] for i in range(len(small) - 1)):
        return None
    return [i for i, s in enumerate(small) if s] + [i for i, s in enumerate(small) if not s]
