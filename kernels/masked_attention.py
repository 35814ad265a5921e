"""Bidirectional flash attention with a key-padding mask (the vision tower).

Every image tile is a sequence of T = 1,024 patches (12 heads of 64 in SmolVLM2-256M). A tile
padded by the processor has invalid patches, which no query may attend to; the mask is per key,
not a prefix, because the valid patches of a padded image form a rectangle in the patch grid.
Queries at padded positions are still computed (transformers does so, and their outputs flow
into the connector).

q/k/v are [B, T, H, D] with any strides except a contiguous head_dim, so views of a fused qkv
projection work without a copy. One program computes BLOCK_M query rows of one head of one
tile, looping over all key tiles. Reference: reference.reference_masked_attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_math import LOG2_E, dot, online_softmax_step
from .checks import (
    ATTENTION_DTYPES,
    check_device,
    check_dtype,
    check_head_dim,
    check_last_dim_contiguous,
    check_same_dtype,
    check_scale,
    check_shape,
    dot_precision,
)
from .tile_config import TileConfig, prefill_config


@triton.jit
def _masked_attention_kernel(
    q_ptr,  # [B, T, H, D]
    k_ptr,  # [B, T, H, D]
    v_ptr,  # [B, T, H, D]
    out_ptr,  # [B, T, H, D]
    key_valid_ptr,  # [B, T] uint8 (1 = valid key); unused when HAS_MASK is False
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_token, stride_k_head,
    stride_v_batch, stride_v_token, stride_v_head,
    stride_o_batch, stride_o_token, stride_o_head,
    stride_mask_batch,
    seq_len,  # T
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN_T: tl.constexpr,  # T % BLOCK_N == 0: no ragged last key tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets within a tile
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row_valid = rows < seq_len  # [BLOCK_M]

    q_base = q_ptr + batch.to(tl.int64) * stride_q_batch + head * stride_q_head
    k_base = k_ptr + batch.to(tl.int64) * stride_k_batch + head * stride_k_head
    v_base = v_ptr + batch.to(tl.int64) * stride_v_batch + head * stride_v_head
    mask_base = key_valid_ptr + batch.to(tl.int64) * stride_mask_batch
    q = tl.load(q_base + rows[:, None] * stride_q_token + dims[None, :], mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start in range(0, seq_len, BLOCK_N):
        keys = start + cols  # [BLOCK_N]
        if EVEN_T:
            k = tl.load(k_base + keys[:, None] * stride_k_token + dims[None, :])  # [BLOCK_N, D]
            v = tl.load(v_base + keys[:, None] * stride_v_token + dims[None, :])  # [BLOCK_N, D]
        else:
            in_range = keys < seq_len  # [BLOCK_N]
            k = tl.load(k_base + keys[:, None] * stride_k_token + dims[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_v_token + dims[None, :], mask=in_range[:, None], other=0.0)
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_MASK:
            key_valid = tl.load(mask_base + keys, mask=keys < seq_len, other=0) != 0  # [BLOCK_N]
            scores = tl.where(key_valid[None, :], scores, float("-inf"))
        elif not EVEN_T:
            scores = tl.where((keys < seq_len)[None, :], scores, float("-inf"))
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # a tile with no valid key gives 0
    out_base = out_ptr + batch.to(tl.int64) * stride_o_batch + head * stride_o_head
    tl.store(out_base + rows[:, None] * stride_o_token + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def masked_attention(
    q: torch.Tensor,  # [B, T, H, D]
    k: torch.Tensor,  # [B, T, H, D]
    v: torch.Tensor,  # [B, T, H, D]
    key_padding_mask: torch.Tensor | None,  # [B, T] bool, True = valid key; None = all valid
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [B, T, H, D], written in place when given
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Bidirectional attention with key padding. Returns [B, T, H, D] in q's dtype.

    A tile whose keys are all padding yields zeros (no NaN)."""
    device = check_device({"q": q, "k": k, "v": v, "key_padding_mask": key_padding_mask, "out": out})
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("q", q, {"k": k, "v": v})
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim], got shape {tuple(q.shape)}")
    batch, seq_len, num_heads, head_dim = q.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_shape(name, t, tuple(q.shape), "[batch, tokens, heads, head_dim], same as q")
        check_last_dim_contiguous(name, t)
    check_head_dim(head_dim)
    check_scale(scale)
    if key_padding_mask is not None:
        check_dtype("key_padding_mask", key_padding_mask, (torch.bool,))
        check_shape("key_padding_mask", key_padding_mask, (batch, seq_len), "[batch, tokens]")
        if key_padding_mask.stride(-1) != 1:
            raise ValueError(f"key_padding_mask must be contiguous along tokens, got strides {key_padding_mask.stride()}")
        key_valid = key_padding_mask.view(torch.uint8)  # [B, T], same bytes, loadable by Triton
    else:
        key_valid = q  # any pointer: HAS_MASK=False never reads it
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_shape("out", out, tuple(q.shape), "same as q")
        check_same_dtype("q", q, {"out": out})
        check_last_dim_contiguous("out", out)
    if q.numel() == 0:
        return out

    config = config or prefill_config(device, q.dtype, head_dim)
    grid = (triton.cdiv(seq_len, config.block_m), num_heads, batch)
    _masked_attention_kernel[grid](
        q, k, v, out, key_valid,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        key_valid.stride(0) if key_padding_mask is not None else 0,
        seq_len,
        scale * LOG2_E,
        HEAD_DIM=head_dim,
        HAS_MASK=key_padding_mask is not None,
        EVEN_T=seq_len % config.block_n == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype, device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
