"""The decoder's few-row operations, passed in per call: `TorchOps` (the reference) or `KernelOps`.

A decode step runs the same decoder as a prefill, on one token per sequence. There, what costs is
not arithmetic but reading every weight once and the fixed cost of ~1,000 small ops, so an engine may
run the weight products, RMSNorms and RoPE through faster kernels. Like attention (text.AttentionFn),
they are an *argument*: `TextModel.forward(embeds, positions, attention, ops)`. The model holds no
switch; whoever calls it chooses, per call, and a plain `model(input_ids)` always runs `TORCH_OPS`.

    ops.linear(x, weight, bias)   # F.linear, with linear.py's CPU bf16 rule
    ops.rms_norm(x, weight, eps)  # LlamaRMSNorm
    ops.rotary(x, cos, sin)       # rotate-half RoPE

`TorchOps` is plain PyTorch and is what every other implementation is tested against.
`KernelOps(kernels)` sends the calls that `kernels` accepts (e.g. `smolvlm_cpu_kernels.CpuKernels`:
CPU, at most 8 rows) to them and the rest to `TorchOps`. The ops only ever receive the modules'
current parameters (`module.weight`), so an edited or replaced weight is honoured on every path.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from smolvlm.linear import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim (transformers: LlamaRMSNorm.forward).

    fp32 island: the variance and the normalisation run in fp32, the weight multiplies in the input
    dtype. F.rms_norm without a weight is the same x * rsqrt(mean(x^2) + eps) in one op (bitwise
    equal on CPU, checked in tests)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D); cos/sin (..., D), broadcast over heads (transformers: apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., 1, D)
    return x * cos + rotate_half(x) * sin


class Ops(Protocol):
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor: ...


class TorchOps:
    """The reference: plain PyTorch (the functions above and linear.linear)."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, weight, bias)

    def linear_int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """quant.Int8Linear's product (int8 weights, a scale per group of 32)."""
        from smolvlm.quant import int8_linear

        return int8_linear(x, qweight, scales)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)


TORCH_OPS = TorchOps()


class DecodeKernels(Protocol):
    """What `KernelOps` needs of a kernel library: each op with a test of whether it applies."""

    def accepts(self, x: torch.Tensor, weight: torch.Tensor) -> bool: ...

    def matvec(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...  # F.linear(x, weight)

    def accepts_rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> bool: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def accepts_rotary(self, x: torch.Tensor, cos: torch.Tensor) -> bool: ...

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor: ...


class KernelOps(TorchOps):
    """`kernels` where they accept the inputs (few rows, CPU, fp32/bf16), the reference elsewhere.

    Inputs that need gradients always take the reference: the kernels compute no backward. (These
    run ~200 times per decoded token, so the checks are written out rather than factored.)"""

    def __init__(self, kernels: DecodeKernels):
        self.kernels = kernels

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
                and self.kernels.accepts(x, weight):
            return self.kernels.matvec(x, weight)
        return linear(x, weight, bias)

    def linear_int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        accepts = getattr(self.kernels, "accepts_int8", None)
        if accepts is not None and not (torch.is_grad_enabled() and x.requires_grad) and accepts(x, qweight):
            return self.kernels.matvec_int8(x, qweight, scales)
        return super().linear_int8(x, qweight, scales)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
                and self.kernels.accepts_rms_norm(x, weight):
            return self.kernels.rms_norm(x, weight, eps)
        return rms_norm(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) and self.kernels.accepts_rotary(x, cos):
            return self.kernels.rotary(x, cos, sin)
        return apply_rotary(x, cos, sin)
