"""Causal flash attention of new tokens over a paged KV cache (prefix-cached / chunked prefill).

The cache of one decoder layer is a pool of fixed-size blocks, [num_blocks, block_size, Hkv, D];
sequence b's token j lives in block block_tables[b, j // block_size] at offset j % block_size.
The new tokens' K/V must already be stored (store_kv) before this kernel runs, so each sequence
attends over its whole context of seq_lens_k[b] tokens: a cached prefix plus the q_len new ones.
Queries are the last q_len positions of the context (bottom-right causal alignment), which also
makes a decode step just a sequence with q_len = 1, so one launch serves mixed batches.

One program computes BLOCK_M query rows of one head of one sequence. Each key tile of BLOCK_N
positions is gathered through the block table (BLOCK_N need not match block_size). Key tiles
fully visible to every row of the query block run without masks; only the rest (the causal
diagonal, the ragged end of the context) apply them.
Reference: reference.reference_paged_prefill_attention.
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
    check_gqa,
    check_head_dim,
    check_index,
    check_last_dim_contiguous,
    check_paged_cache,
    check_same_dtype,
    check_scale,
    dot_precision,
)
from .tile_config import TileConfig, prefill_config


@triton.jit
def _paged_prefill_attention_kernel(
    q_ptr,  # [Nq, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    out_ptr,  # [Nq, Hq, D]
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q_ptr,  # [B + 1] int32
    seq_lens_k_ptr,  # [B] int32, context length including the new tokens
    stride_q_token, stride_q_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,  # shared by k_cache and v_cache
    stride_o_token, stride_o_head,
    stride_table_seq,
    qk_scale,  # softmax scale * log2(e)
    KV_BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    k_len = tl.load(seq_lens_k_ptr + seq)
    kv_head = head // QUERIES_PER_KV

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index among the new tokens
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row_valid = rows < q_len  # [BLOCK_M]

    q_base = q_ptr + q_start.to(tl.int64) * stride_q_token + head * stride_q_head
    q = tl.load(q_base + rows[:, None] * stride_q_token + dims[None, :], mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq  # this sequence's block table
    head_offset = kv_head * stride_cache_head

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Keys [0, full_end) are visible to every row of the block; [full_end, end) to some rows.
    first_row_sees = m_block * BLOCK_M + k_len - q_len + 1
    last_row_sees = tl.minimum((m_block + 1) * BLOCK_M, q_len) + k_len - q_len
    full_end = tl.maximum(tl.minimum(first_row_sees, k_len), 0) // BLOCK_N * BLOCK_N
    end = tl.maximum(tl.minimum(last_row_sees, k_len), 0)

    for start in range(0, full_end, BLOCK_N):
        keys = start + cols  # [BLOCK_N] positions in the sequence
        blocks = tl.load(table + keys // KV_BLOCK_SIZE).to(tl.int64)  # [BLOCK_N] physical block ids
        slots = blocks * stride_cache_block + (keys % KV_BLOCK_SIZE) * stride_cache_slot + head_offset  # [BLOCK_N] int64
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :])  # [BLOCK_N, D]
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :])  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    for start in range(full_end, end, BLOCK_N):
        keys = start + cols  # [BLOCK_N]
        key_valid = keys < k_len  # [BLOCK_N]; beyond it the table entries may be garbage
        blocks = tl.load(table + keys // KV_BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)  # [BLOCK_N]
        slots = blocks * stride_cache_block + (keys % KV_BLOCK_SIZE) * stride_cache_slot + head_offset  # [BLOCK_N]
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        visible = key_valid[None, :] & (keys[None, :] <= rows[:, None] + (k_len - q_len))  # [BLOCK_M, BLOCK_N]
        scores = tl.where(visible, scores, float("-inf"))
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    out_base = out_ptr + q_start.to(tl.int64) * stride_o_token + head * stride_o_head
    tl.store(out_base + rows[:, None] * stride_o_token + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [Nq, Hq, D] new tokens, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    seq_lens_k: torch.Tensor,  # [B] int32, context length including the new tokens
    max_seqlen_q: int,
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [Nq, Hq, D]
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens over their paged context. Returns [Nq, Hq, D] in q's dtype.

    Trusted without a device sync: q_len <= seq_lens_k[b], every block id in the first
    cdiv(seq_lens_k[b], block_size) table entries is a valid block, max_seqlen_q >= every q_len."""
    device = check_device({
        "q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
        "cu_seqlens_q": cu_seqlens_q, "seq_lens_k": seq_lens_k, "out": out,
    })
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("q", q, {"k_cache": k_cache, "v_cache": v_cache})
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    check_last_dim_contiguous("q", q)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    check_head_dim(head_dim)
    check_paged_cache(k_cache, v_cache, head_dim)
    check_gqa(num_q_heads, k_cache.shape[2])
    check_index("block_tables", block_tables, dims=2)
    check_index("cu_seqlens_q", cu_seqlens_q, dims=1)
    check_index("seq_lens_k", seq_lens_k, dims=1)
    batch = seq_lens_k.numel()
    if cu_seqlens_q.numel() != batch + 1 or block_tables.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: cu_seqlens_q has {cu_seqlens_q.numel()} offsets, seq_lens_k {batch} lengths, "
            f"block_tables {block_tables.shape[0]} rows (expected B+1, B, B)"
        )
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise TypeError(f"max_seqlen_q must be a non-negative int, got {max_seqlen_q!r}")
    check_scale(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        check_last_dim_contiguous("out", out)
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out

    config = config or prefill_config(device, q.dtype, head_dim)
    grid = (triton.cdiv(max_seqlen_q, config.block_m), num_q_heads, batch)
    _paged_prefill_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, cu_seqlens_q, seq_lens_k,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        scale * LOG2_E,
        KV_BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        QUERIES_PER_KV=num_q_heads // k_cache.shape[2],
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype, device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
