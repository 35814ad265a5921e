"""int8 weights (opt-in, `quantize="int8"`): the decoder's projections and the LM head as int8 with
one fp32 scale per group of 32 input values, like llama.cpp's Q8_0 weights.

    scale[n, g] = max |w[n, 32g : 32g + 32]| / 127
    q[n, k]     = round(w[n, k] / scale[n, k // 32])  in [-127, 127]
    w'[n, k]    = q[n, k] * scale[n, k // 32]         (|w - w'| <= scale / 2 for every element)

Only the weights are stored quantized: activations, the KV cache, norms, the embedding table and
the whole vision tower keep the model's dtype. The C kernel's AVX2 path rounds each product's input
to int16 on the fly (one scale per 32 values: 2^-16 of the group's largest, against the weights'
2^-8), to multiply in integers; the reference (`int8_linear`) keeps it in fp32. The accuracy against
fp32, measured, is in docs/benchmarks.md. A decode step reads 28 % of fp32's weight bytes (int8
plus a 4-byte scale per 32).

Speed: the C kernel takes decode-sized products (CPU, up to `CpuKernels.max_rows_int8` rows); other
calls (prefill, `cpu_kernels="torch"`, CUDA) dequantize the weight for each call, which is slower
than the fp32 model: the int8 mode is for CPU decoding.

`Int8Linear` replaces an `nn.Linear` (`quantize_decoder(model)`); its reference forward is
`dequantize_int8` then the plain product, and decode steps go through `ops.linear_int8` (the C
kernel `matvec_q8` when the engine uses the C kernels). Fused q/k/v and gate/up products are for
plain `Linear`s only, so int8 layers run their projections one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from smolvlm.linear import Linear, linear
from smolvlm.weights import huge_page_buffers

GROUP = 32


def quantize_int8(
    weight: torch.Tensor, rows_per_chunk: int = 2048, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K), K a multiple of 32 -> (q int8 (N, K), scales fp32 (N, K / 32)), computed in fp32.
    `rows_per_chunk` rows at a time, so the fp32 temporaries stay small (the 49k-row LM head would
    otherwise need several fp32 copies of itself at once); the result does not depend on it."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int8 quantization needs in_features divisible by {GROUP}, got {k}")
    if out is None:
        out = (torch.empty(n, k, dtype=torch.int8, device=weight.device),
               torch.empty(n, k // GROUP, dtype=torch.float32, device=weight.device))
    q, scales = out  # (N, K) int8, (N, K / 32) fp32: written in place (e.g. views of a huge-page buffer)
    if q.shape != (n, k) or scales.shape != (n, k // GROUP) or q.dtype != torch.int8 or scales.dtype != torch.float32:
        raise ValueError(f"quantize_int8: out should be int8 {(n, k)} and fp32 {(n, k // GROUP)} tensors")
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        w = weight[rows].detach().float().reshape(-1, k // GROUP, GROUP)  # (rows, G, 32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("int8 quantization: the weight has NaN or infinite values")
        s = w.abs().amax(dim=-1) / 127.0  # (rows, G)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q[rows] = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8).reshape(-1, k)
        scales[rows] = s
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q int8 (N, K), scales (N, K / 32)) -> the fp32 weight (N, K) they stand for."""
    n, k = q.shape
    return (q.float().reshape(n, k // GROUP, GROUP) * scales[..., None]).reshape(n, k)


class Int8Linear(nn.Module):
    """A bias-free projection with int8 weights (buffers `qweight`, `scales`; no parameters: int8
    weights do not train). `forward(x, ops)`: ops.linear_int8, or the reference without ops."""

    takes_ops = True  # linear.call_with_ops hands it the step's ops

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> "Int8Linear":
        if module.bias is not None:
            raise ValueError("Int8Linear has no bias (the decoder's projections and LM head have none)")
        return cls(*quantize_int8(module.weight))

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        if ops is None:
            return int8_linear(x, self.qweight, self.scales)
        return ops.linear_int8(x, self.qweight, self.scales)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.bfloat16()` convert floating buffers; the scales stay fp32 (qweight is int8)."""
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.float()
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group={GROUP}"


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference: F.linear with the dequantized fp32 weight, in fp32, rounded once to x's dtype
    (as the C kernel: the int8 weights are exact in fp32, a bf16 copy would round them again)."""
    return linear(x.float(), dequantize_int8(qweight, scales)).to(x.dtype)


def quantize_decoder(model) -> int:
    """Replace every decoder projection and the LM head of a SmolVLM by an Int8Linear; returns how many.
    The vision tower and connector stay as they are. Run it after merging any LoRA adapter."""
    wrapped = [name for name, m in model.named_modules() if type(m).__name__ == "LoraLinear"]
    if wrapped:
        raise ValueError(f"the model has LoRA adapters ({wrapped[0]}...): merge them first (merge_lora), then quantize")
    count = 0
    # Names only: holding the modules would keep every fp32 weight alive (and, memory-mapped from the
    # checkpoint, resident) until the last one is quantized; this way one is freed as the next is read.
    targets = [name for name, m in model.named_modules()
               if type(m) is Linear and (name.startswith("model.text_model.") or name == "lm_head")]
    # On CPU the int8 weights go into one huge-page buffer (weights.huge_page_buffers): all qweights in
    # module order, then all scales, so a layer's q/k/v (and gate/up) weights lie back to back, as do
    # their scales, and a decode step streams them from huge pages (as the fp32/bf16 weights).
    into = None
    if targets and all(model.get_submodule(n).weight.device.type == "cpu" for n in targets):
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in targets}
        specs = {f"{n}.qweight": (s, torch.int8) for n, s in shapes.items()}
        specs.update({f"{n}.scales": ((s[0], s[1] // GROUP), torch.float32) for n, s in shapes.items() if not s[1] % GROUP})
        into = huge_page_buffers(specs)
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = getattr(owner, child)
        if module.bias is not None:
            raise ValueError("Int8Linear has no bias (the decoder's projections and LM head have none)")
        out = None if into is None or f"{name}.scales" not in into else (into[f"{name}.qweight"], into[f"{name}.scales"])
        setattr(owner, child, Int8Linear(*quantize_int8(module.weight, out=out)))
        count += 1
    if count == 0:
        raise ValueError("no decoder Linear layers to quantize (already quantized, or adapters not merged?)")
    return count
