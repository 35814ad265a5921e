"""Triton kernels of smolvlm (installed as `smolvlm_kernels`; the folder is `kernels/`).

One file per kernel, each with its launcher (which checks its inputs before launching); the
plain-PyTorch references they are tested against live in `reference.py`.

    store_kv                  write new K/V into paged-cache slots (slot -1 = padding, skipped)
    masked_attention          bidirectional attention with a key-padding mask (vision tower)
    paged_prefill_attention   causal attention of new tokens over their paged context
    paged_decode_attention    one query per sequence over its paged context, split-K

On CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1 before importing this
package (Triton reads it when the kernels are defined).

`kernels/cpu/` is a separate package, `smolvlm_cpu_kernels`: C kernels for CPU decode steps, which
must not import Triton (~80 MB of resident memory) as importing this package does.
"""

from .masked_attention import masked_attention
from .paged_decode_attention import paged_decode_attention
from .paged_prefill_attention import paged_prefill_attention
from .store_kv import store_kv
from .tile_config import TileConfig

__all__ = [
    "TileConfig",
    "masked_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
]
