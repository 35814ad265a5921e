"""Matrix products, with one CPU speed trick: large bf16 matmuls run as fp32 GEMMs.

Why: on x86 CPUs without AMX, PyTorch's bf16 GEMM (oneDNN) runs at about half the speed of its
fp32 GEMM (measurements: docs/benchmarks.md). A bf16 matmul is defined as bf16 inputs, fp32
accumulation, one rounding of the output to bf16. Upcasting the bf16 inputs to fp32 is exact,
the fp32 GEMM accumulates in fp32, and `.to(bfloat16)` rounds once: the same function, up to the
order of the sums (which differs between any two GEMM kernels anyway). The cost, converting the
weight per call, is small next to a GEMM with many rows; for few rows (decode) it is not, so
matrix-vector products keep the bf16 kernel.

Decode steps (a few rows) may instead run through faster kernels: those arrive per call as an
`ops` argument (ops.py), never as state on these modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from smolvlm.ops import Ops

# Rows (tokens) from which a bf16 matmul on CPU is run in fp32. Below, the weight upcast costs
# more than the faster GEMM saves (decode steps have 1-8 rows).
FP32_GEMM_MIN_ROWS = 64


def _use_fp32_gemm(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= FP32_GEMM_MIN_ROWS * x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as described in the module docstring."""
    if _use_fp32_gemm(x):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)
    return F.linear(x, weight, bias)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention; bf16 on CPU runs in fp32 and rounds the output once (see above)."""
    # q (..., T, D): decode (T = 1) keeps the bf16 kernel
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-2] >= FP32_GEMM_MIN_ROWS:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) whose forward is `linear` above, or `ops.linear`."""

    takes_ops = True  # call_with_ops hands it the step's ops

    def forward(self, x: torch.Tensor, ops: Ops | None = None) -> torch.Tensor:
        if ops is None:
            return linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight, self.bias)


def call_with_ops(module: nn.Module, x: torch.Tensor, ops: Ops | None) -> torch.Tensor:
    """`module(x, ops)` for our modules that take the step's ops (class attribute `takes_ops`: Linear,
    text.RMSNorm); any other module (a LoRA or research wrapper put in a projection's place) is called
    as `module(x)`, so it gets exactly what it expects. Either way through `__call__`: hooks run."""
    if getattr(module, "takes_ops", False):
        return module(x, ops)
    return module(x)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init while its weight is a meta placeholder.

    `from_pretrained` builds the model on the meta device and then assigns the checkpoint's tensors,
    so initialising placeholders is wasted work; and on CPU the process's first `normal_` (nn.Embedding's
    init) costs ~150 MB of resident memory for the rest of its life. Real tensors initialise as usual.
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
