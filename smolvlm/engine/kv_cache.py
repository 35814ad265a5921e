"""The paged KV cache: one tensor allocated once, sliced into per-layer K and V views.

Layout (vLLM / nano-vllm, and what the Triton kernels in `kernels/` expect), per layer:
    k_cache, v_cache  # [num_blocks, block_size, num_kv_heads, head_dim]
Token slot `s = block * block_size + offset`; the block manager decides which blocks a sequence owns.
The number of blocks comes from a memory budget (`num_blocks_for_budget`).
"""

from __future__ import annotations

import math
import mmap

import torch

from smolvlm.config import TextConfig


class KVCache:
    def __init__(
        self,
        config: TextConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVCache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # Zero-filled, not empty: the torch decode path reads whole blocks (masked), and a NaN bit
        # pattern left in an unused slot would survive `0 * NaN` in the weighted sum.
        if torch.device(device).type == "cpu":
            # An anonymous memory map: zeroed pages that the OS commits on first write, so the pool
            # costs resident memory only as sequences fill it (torch.zeros writes every page). Huge
            # pages are refused: a prefill writes a few KB into each of many blocks, and a first
            # touch of a huge page zeroes 2 MB, or stalls on memory compaction (docs/benchmarks.md has
            # what that cost a prefill).
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self._buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
                self._buffer.madvise(mmap.MADV_NOHUGEPAGE)
            self.data = torch.frombuffer(self._buffer, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        # self.data: (L, K/V, num_blocks, block_size, Hkv, D)
        # The per-layer views, made once: every layer of every step asks for them.
        self._layers = [(self.data[i, 0], self.data[i, 1]) for i in range(config.num_hidden_layers)]

    def scrub(self, block_ids: list[int]) -> None:
        """Zero these blocks in every layer: K/V a failed request left (NaN, inf) must not reach the
        next owner, whose masked reads of a block's unused slots would turn `0 * NaN` into NaN."""
        if block_ids:
            index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
            self.data.index_fill_(2, index, 0)  # data: (L, K/V, num_blocks, block_size, Hkv, D)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each a contiguous [num_blocks, block_size, Hkv, D] view."""
        return self._layers[layer_idx]

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def bytes_per_block(config: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element

    @staticmethod
    def num_blocks_for_budget(config: TextConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
        num_blocks = budget_bytes // KVCache.bytes_per_block(config, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(
                f"a KV-cache budget of {budget_bytes} bytes holds no block of {block_size} tokens "
                f"({KVCache.bytes_per_block(config, block_size, dtype)} bytes each)"
            )
        return int(num_blocks)
