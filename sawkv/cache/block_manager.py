"""Block (page) allocator with prefix caching.

Every full page of a sequence is identified by a hash chained over all tokens up to its end,
so equal prefixes map to equal pages. Pages are reference-counted: a shared prefix page has one
reference per sequence using it. A page whose count drops to zero goes to the free list but
keeps its hash, so a later request with the same prefix can still hit it until the page is
reused (least recently freed first). Works for any page format (INT4 included): the K/V a page
holds depend only on the tokens and positions before its end.

With attention sinks (``num_first_blocks`` > 0), every sequence's first page comes from pages
``0 .. num_first_blocks - 1`` and every other page from the rest, so a first page's id also
names the row of the sinks' exact K/V (:class:`sawkv.cache.kv_cache.SinkStore`): shared with
the page on a prefix-cache hit, released with it. A first page's hash is chained from nothing,
so only first pages are ever matched as first pages.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Sequence(Protocol):
    """What the allocator reads and writes of a request (``sawkv.engine.sequence.Sequence``
    satisfies it; ``cache/`` does not import the engine)."""

    token_ids: list[int]
    num_tokens: int
    num_computed_tokens: int
    block_table: list[int]
    num_hashed_blocks: int


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    """Allocates pages to sequences; ``num_blocks`` pages of ``block_size`` tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        num_first_blocks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_blocks}")
        if not 0 <= num_first_blocks < num_blocks:
            raise ValueError(
                f"num_first_blocks must be in 0..{num_blocks - 1} (pages {num_blocks}), "
                f"got {num_first_blocks}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_first_blocks = num_first_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # first pages (attention sinks) and the rest; one pool when there are no sinks
        self.free_first: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in range(num_first_blocks)
        )
        self.free_ids: OrderedDict[int, None] = OrderedDict(
            (i, None) for i in range(num_first_blocks, num_blocks)
        )
        self.hash_to_id: dict[int, int] = {}
        self.num_hit_tokens = 0  # counted by the scheduler when a sequence is admitted

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.free_first)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached pages holding ``seq``'s leading full pages; return tokens covered.

        At least one token is left uncomputed so the step has a query to produce logits from.
        Call only on a sequence that holds no pages.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        prev = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(prev, tokens)
            block_id = self.hash_to_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            prev = h
        seq.num_hashed_blocks = len(seq.block_table)
        return len(seq.block_table) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the pages of ``seq`` that are now full and computed, so others can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_hashed_blocks:  # most decode steps: no page filled up
            return
        prev = (
            self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash
            if seq.num_hashed_blocks
            else None
        )
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(prev, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_id.setdefault(h, block.block_id)
            prev = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    # ---- allocation ---------------------------------------------------------------------
    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` pages for its first ``num_tokens`` tokens; False (nothing taken) if the
        pool is short."""
        need = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        first = 1 if self.num_first_blocks and not seq.block_table else 0
        if first > len(self.free_first) or need - first > len(self.free_ids):
            return False
        if first:
            seq.block_table.append(self._take_free(self.free_first))
        for _ in range(need - first):
            seq.block_table.append(self._take_free(self.free_ids))
        return True

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its tail pages are reused first (reverse order)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._pool(block_id)[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _pool(self, block_id: int) -> OrderedDict[int, None]:
        return self.free_first if block_id < self.num_first_blocks else self.free_ids

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._pool(block_id)[block_id]
        block.ref_count += 1

    def _take_free(self, pool: OrderedDict[int, None]) -> int:
        block_id, _ = pool.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_id.get(block.hash) == block_id:
            del self.hash_to_id[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
