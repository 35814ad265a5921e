"""Kernels of smolvlm (installed as `smolvlm_kernels`; the folder is `kernels/`).

Triton kernels, one file per kernel, each with its launcher (which checks its inputs before
launching); the plain-PyTorch references they are tested against live in `reference.py`.

    store_kv                  write new K/V into paged-cache slots (slot -1 = padding, skipped)
    varlen_attention          flash attention over packed variable-length sequences, causal or not
    masked_attention          bidirectional attention with a key-padding mask (vision tower)
    paged_prefill_attention   causal attention of new tokens over their paged context
    paged_decode_attention    one query per sequence over its paged context, split-K

On CPU the Triton kernels run under Triton's interpreter: set TRITON_INTERPRET=1 before using them
(Triton reads it when a kernel module is first imported).

C kernels for CPU decode steps, compiled at first use (no Triton involved):

    CpuKernels                matvec (F.linear for a few rows, streaming bf16/fp32 weights), RMSNorm,
                              store_kv and paged decode attention (cpu_kernels.c, cpu_kernels.py)

Names are imported on first use (PEP 562), so `from smolvlm_kernels import CpuKernels` does not
import Triton (~80 MB of resident memory on CPU).
"""

import importlib

_EXPORTS = {
    "CpuKernels": ".cpu_kernels",
    "CpuKernelsUnavailable": ".cpu_kernels",
    "TileConfig": ".tile_config",
    "masked_attention": ".masked_attention",
    "paged_decode_attention": ".paged_decode_attention",
    "paged_prefill_attention": ".paged_prefill_attention",
    "store_kv": ".store_kv",
    "varlen_attention": ".varlen_attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smolvlm_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__
