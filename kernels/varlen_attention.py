"""Variable-length flash attention over packed sequences (prefill of new tokens).

Sequences are concatenated along the token axis and delimited by cumulative lengths
(`cu_seqlens`, as in flash-attn's varlen API): sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
and k/v rows cu_seqlens_k[b]:cu_seqlens_k[b+1]. Query head h reads key/value head
h // (Hq // Hkv) (grouped-query attention; MHA when Hq == Hkv).

Causal masking is bottom-right aligned: with q_len <= k_len, query i of a sequence sees keys
j <= i + (k_len - q_len), i.e. the queries are the last q_len tokens of the context.

One program computes BLOCK_M query rows of one head of one sequence. Its key loop has two phases:
tiles that every row of the block may fully see run without any mask; the remaining tiles (the
diagonal, the ragged end of the sequence) apply the masks. Reference: reference.reference_varlen_attention.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .checks import (
    ATTENTION_DTYPES,
    check_device,
    check_dtype,
    check_gqa,
    check_head_dim,
    check_index,
    check_last_dim_contiguous,
    check_same_dtype,
    check_scale,
    dot_precision,
)
from .attention_math import LOG2_E, dot, online_softmax_step
from .tile_config import TileConfig, prefill_config


@triton.jit
def _varlen_attention_kernel(
    q_ptr,  # [Nq, Hq, D]
    k_ptr,  # [Nk, Hkv, D]
    v_ptr,  # [Nk, Hkv, D]
    out_ptr,  # [Nq, Hq, D]
    cu_seqlens_q_ptr,  # [B + 1] int32
    cu_seqlens_k_ptr,  # [B + 1] int32
    stride_q_token, stride_q_head,  # q strides (last dim is contiguous)
    stride_k_token, stride_k_head,
    stride_v_token, stride_v_head,
    stride_o_token, stride_o_head,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D, a power of two
    QUERIES_PER_KV: tl.constexpr,  # Hq // Hkv
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid covers the longest sequence; shorter ones stop early
        return
    k_start = tl.load(cu_seqlens_k_ptr + seq)
    k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start
    kv_head = head // QUERIES_PER_KV

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions in the sequence
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets within a tile
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row_valid = rows < q_len  # [BLOCK_M]

    # Sequence starts can be far into a large packed batch: 64-bit base offsets.
    q_base = q_ptr + q_start.to(tl.int64) * stride_q_token + head * stride_q_head
    k_base = k_ptr + k_start.to(tl.int64) * stride_k_token + kv_head * stride_k_head
    v_base = v_ptr + k_start.to(tl.int64) * stride_v_token + kv_head * stride_v_head
    q = tl.load(q_base + rows[:, None] * stride_q_token + dims[None, :], mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Keys [0, full_end) are visible to every row of this block: no masks there.
    # Keys [full_end, end) are visible to some rows: masked tiles.
    if CAUSAL:
        first_row_sees = m_block * BLOCK_M + k_len - q_len + 1  # keys visible to the block's first row
        last_row_sees = tl.minimum((m_block + 1) * BLOCK_M, q_len) + k_len - q_len  # ... to its last row
        full_end = tl.maximum(tl.minimum(first_row_sees, k_len), 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(last_row_sees, k_len), 0)
    else:
        full_end = k_len // BLOCK_N * BLOCK_N
        end = k_len

    for start in range(0, full_end, BLOCK_N):
        keys = start + cols  # [BLOCK_N]
        k = tl.load(k_base + keys[:, None] * stride_k_token + dims[None, :])  # [BLOCK_N, D]
        v = tl.load(v_base + keys[:, None] * stride_v_token + dims[None, :])  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    for start in range(full_end, end, BLOCK_N):
        keys = start + cols  # [BLOCK_N]
        key_valid = keys < k_len  # [BLOCK_N]
        k = tl.load(k_base + keys[:, None] * stride_k_token + dims[None, :], mask=key_valid[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_v_token + dims[None, :], mask=key_valid[:, None], other=0.0)
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        visible = key_valid[None, :]  # [1, BLOCK_N]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + (k_len - q_len))  # [BLOCK_M, BLOCK_N]
        scores = tl.where(visible, scores, float("-inf"))
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # rows with no visible key stay 0
    out_base = out_ptr + q_start.to(tl.int64) * stride_o_token + head * stride_o_head
    tl.store(out_base + rows[:, None] * stride_o_token + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def varlen_attention(
    q: torch.Tensor,  # [Nq, Hq, D]
    k: torch.Tensor,  # [Nk, Hkv, D]
    v: torch.Tensor,  # [Nk, Hkv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    cu_seqlens_k: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,  # [Nq, Hq, D], written in place when given
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Flash attention over packed variable-length sequences. Returns [Nq, Hq, D] in q's dtype.

    The kernel trusts cu_seqlens (monotone, cu[0] = 0, cu[-1] <= N, q_len <= k_len when causal)
    and max_seqlen_q (>= every q_len: rows beyond it are not computed); they are not checked on
    the device to avoid a synchronisation.
    """
    device = check_device({"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "out": out})
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("q", q, {"k": k, "v": v})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    if k.shape[2] != head_dim:
        raise ValueError(f"k head_dim {k.shape[2]} differs from q head_dim {head_dim}")
    check_head_dim(head_dim)
    check_gqa(num_q_heads, num_kv_heads)
    check_index("cu_seqlens_q", cu_seqlens_q, dims=1)
    check_index("cu_seqlens_k", cu_seqlens_k, dims=1)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
        raise ValueError(
            f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) must both hold B+1 >= 2 offsets"
        )
    if not isinstance(max_seqlen_q, int) or not isinstance(max_seqlen_k, int) or max_seqlen_q < 0 or max_seqlen_k < 0:
        raise TypeError(f"max_seqlen_q / max_seqlen_k must be non-negative ints, got {max_seqlen_q!r}, {max_seqlen_k!r}")
    check_scale(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        check_last_dim_contiguous("out", out)

    batch = cu_seqlens_q.numel() - 1
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out
    config = config or prefill_config(device, q.dtype, head_dim)
    grid = (triton.cdiv(max_seqlen_q, config.block_m), num_q_heads, batch)
    _varlen_attention_kernel[grid](
        q, k, v, out,
        cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        scale * LOG2_E,
        HEAD_DIM=head_dim,
        QUERIES_PER_KV=num_q_heads // num_kv_heads,
        CAUSAL=bool(causal),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype, device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
