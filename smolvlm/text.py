"""Llama-style decoder (SmolLM2): token embeddings -> hidden states.

Matches `LlamaModel` (transformers/models/llama/modeling_llama.py): pre-norm RMSNorm (computed in
fp32), rotary position embeddings (rotate-half, non-interleaved), grouped-query attention, SwiGLU
MLP, final RMSNorm. The LM head lives in `model.py`.

Two things change between uses, so the decoder takes both as arguments instead of holding them:

- *attention*: a whole prompt at once (`CausalAttention` below, for `SmolVLM.forward`), or the
  engine's paged KV cache, or a Triton kernel. Every layer calls
      attention(layer_idx, q, k, v, scale) -> out   q (..., Hq, D), k/v (..., Hkv, D), out (..., Hq, D)
  where `...` is whatever token layout the caller uses ((B, T) here, flat (N,) in the engine).
- *ops*: the few-row operations (weight products, RMSNorm, RoPE; ops.py). `TORCH_OPS` is the
  reference; an engine on CPU passes C kernels for its decode steps.

Fused projections (speed, not a different function): a step of fewer than FUSED_MAX_ROWS tokens
runs q/k/v as one matrix product and gate/up as another, over a matrix that is a *view* spanning the
checkpoint's own weights where they lie back to back in memory (`fused_weight`; `SmolVLM.from_pretrained`
lays them out so). Nothing is copied and nothing is cached: each call reads the modules' current
weights, and when they are not plain adjacent `Linear`s (a replaced weight, a wrapped or hooked
projection, weights that need gradients) the step calls the modules one by one instead.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules import module as _torch_modules

from smolvlm.config import TextConfig
from smolvlm.hookpoint import HookPoint, attention_probabilities, is_hooked, weighted_values
from smolvlm.linear import Embedding, Linear, call_with_ops, scaled_dot_product_attention
from smolvlm.ops import TORCH_OPS, Ops
from smolvlm.quant import Int8Linear


# The fused products serve steps of few tokens (decode); long prefills are faster with the separate
# matrices (measurements: docs/benchmarks.md).
FUSED_MAX_ROWS = 64
# the projections whose weights are laid out back to back, so one matrix product can run them all
FUSED_PROJECTIONS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


class AttentionFn(Protocol):
    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    takes_ops = True  # call_with_ops hands it the step's ops

    def forward(self, x: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # fp32 island inside (ops.rms_norm)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; inv_freq = 1 / theta^(2i/D), kept in fp32 on every dtype."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Explicit device: the model may be built under `torch.device("meta")` before its weights load,
        # and this buffer is computed, not loaded.
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / self.theta**exponents  # (D/2,) fp32

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` converts every floating buffer; the frequencies must stay fp32
        # (rounded to bf16 they would move every position's angle), so only their device follows.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 island (transformers: LlamaRotaryEmbedding.forward): angles in fp32, cast at the end.
        angles = positions.float()[..., None] * self.inv_freq  # (..., D/2)
        emb = torch.cat((angles, angles), dim=-1)  # (..., D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.softmax_scale
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=False)
        self.weights = HookPoint()  # attention probabilities, computed only when hooked (hookpoint.py)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn, ops: Ops = TORCH_OPS
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # (B, T) or (N,)
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv_weight = fused_weight(x, self.q_proj, self.k_proj, self.v_proj)  # ((Hq + 2 Hkv) * D, hidden) or None
        if qkv_weight is not None:
            qkv = ops.linear(x, qkv_weight).view(*lead, hq + 2 * hkv, self.head_dim)  # (..., Hq+2Hkv, D)
            qk = ops.rotary(qkv[..., : hq + hkv, :], cos, sin)  # q and k heads rotated together
            q, k, v = qk[..., :hq, :], qk[..., hq:, :], qkv[..., hq + hkv :, :]
        else:
            q = call_with_ops(self.q_proj, x, ops).view(*lead, hq, self.head_dim)  # (..., Hq, D)
            k = call_with_ops(self.k_proj, x, ops).view(*lead, hkv, self.head_dim)  # (..., Hkv, D)
            v = call_with_ops(self.v_proj, x, ops).view(*lead, hkv, self.head_dim)  # (..., Hkv, D)
            q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        out = attention(self.layer_idx, q, k, v, self.scale)  # (..., Hq, D)
        if is_hooked(self.weights):
            out = self._through_weights_hook(q, k, v, out, attention)
        return call_with_ops(self.o_proj, out.reshape(*lead, hq * self.head_dim), ops)


    def _through_weights_hook(self, q, k, v, out, attention) -> torch.Tensor:
        """Show the attention probabilities to the hooks on `self.weights`; if one replaces them, the
        output becomes replacement @ V. q (B, T, Hq, D), k/v (B, T, Hkv, D), out (B, T, Hq, D)."""
        allowed = getattr(attention, "allowed", None)
        if allowed is None:
            raise RuntimeError(
                f"attention probabilities (a hook on layers.{self.layer_idx}.self_attn.weights) exist only in a "
                f"whole-sequence forward (model(...), smolvlm.research), not with {type(attention).__name__}"
            )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        probabilities = attention_probabilities(q, k, allowed(q.shape[2], k.shape[2]), self.scale)  # (B, Hq, T, T)
        replaced = self.weights(probabilities)
        if replaced is probabilities:
            return out  # only looked at: the fast kernel's output stands, bit for bit
        return weighted_values(replaced, v).transpose(1, 2)  # (B, T, Hq, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        gate_up_weight = fused_weight(x, self.gate_proj, self.up_proj)  # (2 * intermediate, hidden) or None
        if gate_up_weight is not None:
            gate, up = ops.linear(x, gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = call_with_ops(self.gate_proj, x, ops), call_with_ops(self.up_proj, x, ops)
        return call_with_ops(self.down_proj, F.silu(gate) * up, ops)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn, ops: Ops = TORCH_OPS
    ) -> torch.Tensor:
        # An engine's decode step may run the whole layer as one kernel (ops.KernelOps.decoder_layer): the
        # same ops as below, for a plain layer only (no hooks, adapters or gradients), else None.
        fused_layer = getattr(ops, "decoder_layer", None)  # optional in an Ops of one's own (ops.Ops)
        fused = None if fused_layer is None else fused_layer(self, x, cos, sin, attention)
        if fused is not None:
            return fused
        x = x + self.self_attn(call_with_ops(self.input_layernorm, x, ops), cos, sin, attention, ops)
        return x + self.mlp(call_with_ops(self.post_attention_layernorm, x, ops), ops)

    def plain_tensors(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors a fused decoder-layer kernel reads, when this layer computes exactly `forward`
        above with nothing in the way: no hook on any of its modules (nor global ones), projections that
        are bias-free `Linear`s or `quant.Int8Linear`s (not LoRA-wrapped or replaced), norms that are
        this file's RMSNorm, no gradients wanted. Else None. Order: the two norm weights, then per
        projection (q, k, v, o, gate, up, down) its weight (Linear) or qweight and scales (Int8Linear).
        Runs once per layer and decode step: it reads the modules' dicts directly (nn.Module's attribute
        lookup costs more than the checks)."""
        if _torch_modules._global_forward_hooks or _torch_modules._global_forward_pre_hooks:
            return None
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        ln1, ln2 = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
        if type(ln1) is not RMSNorm or type(ln2) is not RMSNorm or ln1.eps != ln2.eps:
            return None
        a, m = attn._modules, mlp._modules
        projections = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])
        for module in (self, attn, mlp, a["weights"], ln1, ln2, *projections):
            if module._forward_hooks or module._forward_pre_hooks:
                return None
        grad = torch.is_grad_enabled()
        tensors = [ln1._parameters["weight"], ln2._parameters["weight"]]
        for module in projections:
            if type(module) is Linear:
                if module._parameters["bias"] is not None:
                    return None
                tensors.append(module._parameters["weight"])
            elif type(module) is Int8Linear:
                tensors += (module._buffers["qweight"], module._buffers["scales"])
            else:
                return None
        if grad and any(t.requires_grad for t in tensors):
            return None
        return tuple(tensors)

    def plain_parts(self, tensors: tuple[torch.Tensor, ...]) -> dict | None:
        """`plain_tensors()` arranged for the kernel: projections as lists of [weight, scales or None,
        rows] pieces, where weights lying back to back in memory form one piece (rows: all of theirs,
        one longer product; weights.huge_page_arena and quant.quantize_decoder lay q/k/v and gate/up out
        so: for int8, their scales too); the rest one each."""
        attn = self._modules["self_attn"]
        rest = list(tensors[2:])
        per_projection = []
        for _ in range(7):  # q, k, v, o, gate, up, down
            weight = rest.pop(0)
            scales = rest.pop(0) if weight.dtype == torch.int8 else None
            if weight.dim() != 2 or not weight.is_contiguous():
                return None
            per_projection.append((weight, scales))

        def pieces(group) -> list:
            out = []
            for weight, scales in group:
                prev = out[-1] if out else None
                k = weight.shape[1]
                follows = prev is not None and weight.dtype == prev[0].dtype and k == prev[0].shape[1] \
                    and weight.data_ptr() == prev[0].data_ptr() + prev[2] * k * weight.element_size()
                if follows and (scales is None) != (prev[1] is None):
                    follows = False
                if follows and scales is not None:  # int8: the scales must continue theirs too
                    follows = scales.is_contiguous() and scales.shape[1] == prev[1].shape[1] \
                        and scales.data_ptr() == prev[1].data_ptr() + prev[2] * scales.shape[1] * 4
                if follows:
                    prev[2] += weight.shape[0]  # continues the previous piece in memory
                else:
                    out.append([weight, scales, weight.shape[0]])
            return out

        ln1 = self._modules["input_layernorm"]
        return {"norms": tensors[:2], "eps": ln1.eps, "qkv": pieces(per_projection[0:3]), "o": pieces(per_projection[3:4]),
                "gate_up": pieces(per_projection[4:6]), "down": pieces(per_projection[6:7]),
                "heads": (attn.num_heads, attn.num_kv_heads), "scale": attn.scale, "layer_idx": attn.layer_idx}


class TextModel(nn.Module):
    """Embeddings in, final-normed hidden states out (no LM head)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.inputs_embeds = HookPoint()  # the decoder's input: token embeddings, image features merged in

    @torch.no_grad()
    def pack_projections(self) -> None:
        """Lay each group of FUSED_PROJECTIONS out back to back in memory, so `fused_weight` finds them.

        Weights already adjacent (loaded into `weights.huge_page_arena` in module order) stay where
        they are; others are concatenated once and their parameters become views of the result (same
        names, same values). Purely a layout: the model computes the same with or without it."""
        for layer in self.layers:
            for parts in FUSED_PROJECTIONS:
                modules = [layer.get_submodule(p) for p in parts]
                if any(type(m) is not Linear for m in modules):  # LoRA-wrapped, int8: not fused anyway
                    continue
                weights = [m.weight for m in modules]
                one_row = weights[0][:1]  # a decode-sized input, for the layout check alone
                if fused_weight(one_row, *modules) is not None:  # already back to back
                    continue
                packed = torch.cat(weights)  # (sum of out_features, hidden)
                start = 0
                for m, w in zip(modules, weights):
                    m.weight = nn.Parameter(packed[start : start + w.shape[0]], requires_grad=w.requires_grad)
                    start += w.shape[0]

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: AttentionFn, ops: Ops = TORCH_OPS,
        *, checkpoint: bool = False,
    ) -> torch.Tensor:
        """inputs_embeds (..., hidden), positions (...) int -> hidden (..., hidden).
        `checkpoint`: gradient checkpointing, one decoder layer at a time (training: activations
        inside a layer are recomputed in the backward pass instead of kept)."""
        cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)  # (..., D) each, shared by all layers
        x = self.inputs_embeds(inputs_embeds)
        for layer in self.layers:
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attention, ops, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention, ops)
        return call_with_ops(self.norm, x, ops)


def fused_weight(x: torch.Tensor, *projections: nn.Module) -> torch.Tensor | None:
    """One (sum of out_features, in_features) matrix computing all `projections` of `x` at once, when
    that provably equals calling them: a step of few rows, plain bias-free `Linear`s with no hooks,
    weights that need no gradient, lying back to back in memory (the matrix is a view of them).
    Else None: the caller runs the projections one by one.

    Runs twice per layer in every decode step, so it reads the modules' dicts directly (nn.Module's
    attribute lookup costs more than the checks)."""
    if x.numel() >= FUSED_MAX_ROWS * x.shape[-1] or _torch_modules._global_forward_hooks \
            or _torch_modules._global_forward_pre_hooks:  # hooks registered for every module
        return None
    weights = []
    for m in projections:
        if type(m) is not Linear or m._forward_hooks or m._forward_pre_hooks or m._parameters["bias"] is not None:
            return None
        weights.append(m._parameters["weight"])
    first = weights[0]
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None  # the view is not connected to the parameters in autograd
    k, size, address, rows = first.shape[1], first.element_size(), first.data_ptr(), 0
    for w in weights:  # each starts where the previous ends
        if w.data_ptr() != address + rows * k * size or w.dim() != 2 or w.shape[1] != k \
                or w.dtype != first.dtype or not w.is_contiguous():
            return None
        rows += w.shape[0]
    # (rows, K) over the first weight's storage: as_strided refuses it unless that storage holds all
    # of them, and then the bytes after the first weight are the others' (live tensors never overlap)
    try:
        return first.as_strided((rows, k), (k, 1))
    except RuntimeError:  # separate allocations that happen to touch
        return None


class CausalAttention:
    """Attention over one whole (possibly left-padded) batch, no cache: `(B, T)` token layout.

    `attention_mask` (B, T): 1 for real tokens, 0 for padding. Each query sees the real keys at or
    before it. A padding query would see no key at all (a NaN row in softmax); it is allowed to
    see itself instead: its output is never used.
    """

    def __init__(self, attention_mask: torch.Tensor | None, seq_len: int, device: torch.device):
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # (T, T)
        self.causal = causal
        if attention_mask is None or bool(attention_mask.all()):
            self.mask = None  # plain causal: let SDPA use its fast path
        else:
            keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
            diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
            self.mask = (causal & keys) | diagonal  # (B, 1, T, T)

    def allowed(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """Which key each query may see: (B or 1, 1, T, T) bool (for attention probabilities)."""
        if self.mask is not None:
            return self.mask
        return self.causal[None, None]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # (B, T, H, D) -> (B, H, T, D) for SDPA; KV heads are shared by groups of query heads (GQA).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.mask is None:
            out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)  # (B, T, Hq, D)
