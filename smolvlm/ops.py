"""The decoder's few-row operations, passed in per call: `TorchOps` (the reference) or `KernelOps`.

A decode step runs the same decoder as a prefill, on one token per sequence. There, what costs is
not arithmetic but reading every weight once and the fixed cost of ~1,000 small ops, so an engine may
run the weight products, RMSNorms and RoPE through faster kernels. Like attention (text.AttentionFn),
they are an *argument*: `TextModel.forward(embeds, positions, attention, ops)`. The model holds no
switch; whoever calls it chooses, per call, and a plain `model(input_ids)` always runs `TORCH_OPS`.

    ops.linear(x, weight, bias)   # F.linear, with linear.py's CPU bf16 rule
    ops.rms_norm(x, weight, eps)  # LlamaRMSNorm
    ops.rotary(x, cos, sin)       # rotate-half RoPE
    ops.decoder_layer(layer, x, cos, sin, attention)  # optional: a whole text.DecoderLayer, or None

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

    # Optional (text.DecoderLayer looks it up): a whole decoder layer in one call, or None to run it op
    # by op. `linear_int8` is needed by int8 models only (quant.Int8Linear).


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

    def decoder_layer(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention):
        """A whole decoder layer in one kernel, or None: the layer runs op by op (always, here)."""
        return None


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
        self._plans: dict[int, tuple] = {}  # id(layer) -> (key, kernels.layer_plan, layer, tensors): decoder_layer

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

    def decoder_layer(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention):
        """text.DecoderLayer in one call of `kernels.decoder_layer` (the per-op kernels composed in C),
        when all of it can: a decode step of the engine (`attention.fused_decode` gives this layer's
        KV cache and the step's metadata: all decodes, C attention), a few rows, and a plain layer
        (`layer.plain_tensors`). Else None, and the layer runs op by op. Returns a new tensor.
        The checked weight half of the kernel's arguments (`kernels.layer_plan`) is kept per layer and
        made again whenever any of the layer's tensors is another one or has moved."""
        fn = getattr(self.kernels, "decoder_layer", None)
        fused_decode = getattr(attention, "fused_decode", None)
        if fn is None or fused_decode is None or x.dim() != 2 or x.shape[0] > self.kernels.max_rows \
                or (torch.is_grad_enabled() and x.requires_grad):
            return None
        tensors = layer.plain_tensors()
        if tensors is None:
            return None
        step = fused_decode(layer.self_attn.layer_idx, x.shape[0])
        if step is None:
            return None
        # the tensors by identity, address and shape: the plan (raw pointers) is made again when any differs;
        # the cache holds the tensors, so their ids cannot be reused by others while it does
        key = (tuple(map(id, tensors)), tuple(t.data_ptr() for t in tensors), tuple(t.shape for t in tensors))
        cached = self._plans.get(id(layer))
        if cached is None or cached[0] != key:
            parts = layer.plain_parts(tensors)
            if parts is None:
                return None
            plan = self.kernels.layer_plan(parts["norms"], parts["qkv"], parts["o"], parts["gate_up"], parts["down"],
                                           parts["heads"], cos.shape[-1], parts["eps"], parts["scale"])
            cached = self._plans[id(layer)] = (key, plan, layer, tensors)  # the layer held too: its id stays its own
        out = x.clone()  # (M, D), updated in place by the kernel: the caller's x is left as it was
        fn(cached[1], out, cos.contiguous(), sin.contiguous(), *step)
        return out
