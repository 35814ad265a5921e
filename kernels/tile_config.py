"""Tile sizes and launch settings of the attention kernels, chosen in one visible place.

The GPU defaults were picked with `tools/bench_kernels.py --sweep` on an H100 (fp16 and bf16,
head_dim 64; see docs/benchmarks.md): 128 x 64 tiles with 8 warps were fastest over the vision
(64 x 1,024 patches) and causal decoder (16 x 1,024) cases; decode was within noise of the best
for 64 or 128 keys per tile at 2-8 splits.
Every launcher takes an optional `config=TileConfig(...)` so a benchmark or an experiment can
override them without editing the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program (powers of two, >= 16 for tensor-core dots)
    block_n: int  # keys per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2  # software-pipelining depth of the key loop

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages must be >= 1, got {self.num_stages}")


# The CPU interpreter runs each program as numpy calls: small tiles keep tests quick and exercise
# the multi-tile paths (several key tiles, ragged last tiles) even on short sequences.
INTERPRETER_CONFIG = TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)


def prefill_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> TileConfig:
    """Tiles for the prefill kernels (masked, paged prefill)."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def decode_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> TileConfig:
    """Tiles for paged decode: block_m is the padded group of query heads sharing one KV head."""
    if device.type == "cpu":
        return TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
