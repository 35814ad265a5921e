"""Llama-style decoder (SmolLM2): token embeddings -> hidden states.

Matches `LlamaModel` (transformers/models/llama/modeling_llama.py): pre-norm RMSNorm (computed in
fp32), rotary position embeddings (rotate-half, non-interleaved), grouped-query attention, SwiGLU
MLP, final RMSNorm. The LM head lives in `model.py`.

Attention is the one piece that changes between uses (a whole prompt at once for parity tests and
`SmolVLM.forward`, a paged KV cache in the engine, a Triton kernel on GPU), so the decoder does not
compute it itself: every layer calls an *attention function* passed in by the caller,

    attention(layer_idx, q, k, v) -> out      q (..., Hq, D), k/v (..., Hkv, D), out (..., Hq, D)

where `...` is whatever token layout the caller uses ((B, T) here, flat (N,) in the engine).
`CausalAttention` below is the plain one.

Fused projections (speed, not a different function): after loading, `TextModel.fuse_projections()`
concatenates the weights listed in FUSED_PROJECTIONS into one matrix per group, so a decode step runs
one matrix-vector product where it ran three (q/k/v) or two (gate/up); steps of FUSED_MAX_ROWS tokens
or more (prefill) keep the separate products, which are faster there. The checkpoint's parameters
stay, as views into the fused matrix: `layers[i].self_attn.q_proj.weight` is still the checkpoint's
tensor (same name, same memory), so in-place edits of it are seen by the fused path. Replacing a
parameter object after fusing is not: call `fuse_projections()` again.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.config import TextConfig
from smolvlm.linear import Embedding, Linear, DecodeKernels, linear, scaled_dot_product_attention


# The fused matrices serve steps of few tokens (decode: +10% tokens/s in bf16, +5% in fp32 here);
# long prefills are faster with the separate matrices (-13% with fused ones in fp32, 1,141 tokens).
FUSED_MAX_ROWS = 64
# fused matrix -> the checkpoint's projections it concatenates (rows in this order)
FUSED_PROJECTIONS = {
    "self_attn.qkv_weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_weight": ("mlp.gate_proj", "mlp.up_proj"),
}


class AttentionFn(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels: DecodeKernels | None = None  # decode rows in one kernel call (linear.py), set by SmolVLM.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and self.kernels.accepts_rms_norm(x, self.weight):
            return self.kernels.rms_norm(x, self.weight, self.eps)
        # fp32 island: the variance and the normalisation run in fp32, the weight multiplies in the
        # input dtype (transformers: LlamaRMSNorm.forward). F.rms_norm without a weight is the same
        # x * rsqrt(mean(x^2) + eps), in one op (bitwise equal on CPU, checked in tests).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; inv_freq = 1 / theta^(2i/D), kept in fp32 on every dtype."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Explicit device: the model may be built under `torch.device("meta")` before its weights load,
        # and this buffer is computed, not loaded.
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 island (transformers: LlamaRotaryEmbedding.forward): angles in fp32, cast at the end.
        angles = positions.float()[..., None] * self.inv_freq  # (..., D/2)
        emb = torch.cat((angles, angles), dim=-1)  # (..., D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: DecodeKernels | None = None
) -> torch.Tensor:
    """x (..., H, D); cos/sin (..., D), broadcast over heads. `kernels`: see linear.py."""
    if kernels is not None and kernels.accepts_rotary(x, cos):
        return kernels.rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., 1, D)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # ((Hq + 2 Hkv) * D, hidden), set by fuse_projections
        self.kernels: DecodeKernels | None = None  # for the fused product (linear.py), set by SmolVLM.set_kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        lead = x.shape[:-1]  # (B, T) or (N,)
        hq, hkv = self.num_heads, self.num_kv_heads
        if self.qkv_weight is not None and x.numel() < FUSED_MAX_ROWS * x.shape[-1]:
            qkv = linear(x, self.qkv_weight, kernels=self.kernels).view(*lead, hq + 2 * hkv, self.head_dim)  # (..., Hq+2Hkv, D)
            qk = apply_rotary(qkv[..., : hq + hkv, :], cos, sin, self.kernels)  # q and k heads rotated together
            q, k, v = qk[..., :hq, :], qk[..., hq:, :], qkv[..., hq + hkv :, :]
        else:
            q = self.q_proj(x).view(*lead, hq, self.head_dim)  # (..., Hq, D)
            k = self.k_proj(x).view(*lead, hkv, self.head_dim)  # (..., Hkv, D)
            v = self.v_proj(x).view(*lead, hkv, self.head_dim)  # (..., Hkv, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(self.layer_idx, q, k, v)  # (..., Hq, D)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # (2 * intermediate, hidden), set by fuse_projections
        self.kernels: DecodeKernels | None = None  # for the fused product (linear.py), set by SmolVLM.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None and x.numel() < FUSED_MAX_ROWS * x.shape[-1]:
            gate, up = linear(x, self.gate_up_weight, kernels=self.kernels).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings in, final-normed hidden states out (no LM head)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights (FUSED_PROJECTIONS); the originals become views of them.

        Weights already side by side in memory (loaded into `weights.huge_page_arena`, in module order)
        are concatenated as they lie: the fused matrix is a view spanning them, nothing is copied."""
        for layer in self.layers:
            for fused_name, parts in FUSED_PROJECTIONS.items():
                owner_name, attr = fused_name.rsplit(".", 1)
                owner = layer.get_submodule(owner_name)
                weights = [layer.get_submodule(p).weight for p in parts]
                fused = _adjacent_rows(weights)
                if fused is None:
                    fused = torch.cat(weights)  # (sum of out_features, hidden)
                    start = 0
                    for p, w in zip(parts, weights):
                        rows = w.shape[0]
                        layer.get_submodule(p).weight = nn.Parameter(fused[start : start + rows], requires_grad=w.requires_grad)
                        start += rows
                setattr(owner, attr, fused)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """inputs_embeds (..., hidden), positions (...) int -> hidden (..., hidden)."""
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)  # (..., D) each, shared by all layers
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)


def _adjacent_rows(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """torch.cat(weights) as a view, when the (rows, K) matrices lie back to back in one storage; else None."""
    first = weights[0]
    if not all(w.is_contiguous() and w.dim() == 2 and w.shape[1] == first.shape[1] for w in weights):
        return None
    position = first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.storage_offset() != position:
            return None
        position += w.numel()
    rows = sum(w.shape[0] for w in weights)
    fused = torch.empty(0, dtype=first.dtype, device=first.device)
    return fused.set_(first.untyped_storage(), first.storage_offset(), (rows, first.shape[1]))


class CausalAttention:
    """Attention over one whole (possibly left-padded) batch, no cache: `(B, T)` token layout.

    `attention_mask` (B, T): 1 for real tokens, 0 for padding. Each query sees the real keys at or
    before it. A padding query would see no key at all (a NaN row in softmax); it is allowed to
    see itself instead: its output is never used.
    """

    def __init__(self, attention_mask: torch.Tensor | None, seq_len: int, device: torch.device):
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # (T, T)
        if attention_mask is None or bool(attention_mask.all()):
            self.mask = None  # plain causal: let SDPA use its fast path
        else:
            keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
            diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
            self.mask = (causal & keys) | diagonal  # (B, 1, T, T)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, T, H, D) -> (B, H, T, D) for SDPA; KV heads are shared by groups of query heads (GQA).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.mask is None:
            out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        return out.transpose(1, 2)  # (B, T, Hq, D)
