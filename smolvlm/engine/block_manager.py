"""The KV-cache block pool: allocation, reference counts and the prefix cache (pure Python, no torch).

The cache (kv_cache.py) is one tensor of `num_blocks` blocks of `block_size` token slots each; a
sequence owns a *block table* (list of block ids) and token `p` lives in slot
`block_table[p // block_size] * block_size + p % block_size`. This module only does the bookkeeping.

Prefix caching (after nano-vllm's BlockManager and vLLM's KVCacheManager): once every slot of a block
holds computed K/V, the block is registered under `Sequence.block_hash(i)`, a hash chained over all
earlier tokens *and* the content hashes of the images those tokens stand for. A later sequence whose
prompt starts with the same blocks takes them (reference count + 1) instead of recomputing them.
A freed block keeps its hash and K/V while it waits in the free queue, so it can still be hit; it is
only forgotten when the block is handed out again (the hash entry is dropped then, never left stale).
Rules that keep this correct:
- a block is registered only once its K/V is *computed*, never at allocation;
- a hit is confirmed by comparing the block's stored token ids, not the hash alone;
- the last prompt token is never a hit (its logits are needed), so a fully cached prompt still
  computes at least one token, in a block the sequence owns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from smolvlm.engine.sequence import Sequence


class BlockPoolError(RuntimeError):
    """Inconsistent bookkeeping (a bug): double free, negative reference count..."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and computed (prefix-cache key)
    token_ids: tuple[int, ...] | None = None  # the tokens behind `hash`, to confirm a hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is handed out next. Blocks without a hash go to the
        # front (nothing to lose), cached ones to the back (least recently freed evicted first).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest run of computed, registered blocks matching the start of `seq`."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        # Only blocks that end before the last token: that token must be computed for its logits.
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block.get(seq.block_hash(i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.block_token_ids(i)):
                break
            hits.append(block_id)
        return hits

    # ------------------------------------------------------------------ allocation

    def allocate(self, seq: Sequence) -> bool:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks; False if the pool is short.

        On success `seq.num_computed_tokens` counts the cached tokens (their K/V is already there).
        """
        if seq.block_table:
            raise BlockPoolError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._cached_prefix(seq)
        num_new = seq.num_blocks_for(seq.num_tokens) - len(hits)
        hits_from_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new + hits_from_free > len(self.free):
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_fresh() for _ in range(num_new)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)
        return True

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False (and no change) if the pool is short."""
        missing = seq.num_blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self.free):
            return False
        for _ in range(missing):
            seq.block_table.append(self._take_fresh())
        return True

    def free_sequence(self, seq: Sequence, discard: bool = False) -> list[int]:
        """Drop `seq`'s hold on its blocks (reverse order: its last blocks are evicted first); returns
        the blocks that became free. `discard`: their K/V is not to be trusted (the sequence failed with
        non-finite values), so they leave the prefix cache; the caller scrubs their slots."""
        freed = []
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise BlockPoolError(f"block {block_id} of sequence {seq.seq_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                freed.append(block_id)
                self.free[block_id] = None
                if discard and block.hash is not None:
                    if self.hash_to_block.get(block.hash) == block_id:
                        del self.hash_to_block[block.hash]
                    block.hash = block.token_ids = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
        return freed

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full and computed since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching:
            seq.num_committed_blocks = num_full
            return
        for i in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            key = seq.block_hash(i)
            if block.hash is None:
                block.hash, block.token_ids = key, tuple(seq.block_token_ids(i))
                # If an identical block was computed by another sequence meanwhile, keep the older entry.
                self.hash_to_block.setdefault(key, block.block_id)
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    # ------------------------------------------------------------------ internals

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """A free block for new K/V; if it still held a cached prefix, that cache entry is dropped."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their K/V)."""
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = block.token_ids = None
