"""Decode attention over a paged KV cache: one new query token per sequence, split-K.

A decode step is memory-bound: every sequence reads its whole K/V context once and does only
2 * D flops per byte pair. Two choices follow from that:

- GQA sharing: one program handles one KV head and the QUERIES_PER_KV query heads that read it
  (padded to BLOCK_G >= 16 rows for a tensor-core dot), so each K/V byte is loaded once, not
  once per query head.
- Split-K: batch x kv_heads programs are too few to keep an H100's 132 SMs streaming (64 x 3 =
  192 for SmolVLM2-256M at batch 64), so each sequence's context is cut into NUM_SPLITS ranges
  processed by separate programs. Each writes a partial (running max, running sum, unnormalised
  output); a second small kernel merges them exactly (the same rescaling as the online softmax).
  With NUM_SPLITS = 1 the first kernel writes the output directly.

The split count is chosen without reading context_lens on the host (no device sync): from the
block-table width (or `max_context_len`) and the GPU's SM count. Reference:
reference.reference_paged_decode_attention.
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
from .tile_config import TileConfig, decode_config


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks_per_seq] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D], written when NUM_SPLITS == 1
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] fp32 unnormalised outputs, written when NUM_SPLITS > 1
    partial_max_ptr,  # [B, Hq, NUM_SPLITS] fp32 running max (log2 units)
    partial_sum_ptr,  # [B, Hq, NUM_SPLITS] fp32 running sum of exponentials
    stride_q_seq, stride_q_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_o_seq, stride_o_head,
    stride_table_seq,
    tokens_per_split,  # a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    KV_BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,  # query heads per program, padded: >= QUERIES_PER_KV and >= 16
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, context_len)

    group = tl.arange(0, BLOCK_G)  # [BLOCK_G] query heads of this KV head (padded)
    heads = kv_head * QUERIES_PER_KV + group  # [BLOCK_G]
    head_valid = group < QUERIES_PER_KV  # [BLOCK_G]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    dims = tl.arange(0, HEAD_DIM)  # [D]

    q_base = q_ptr + seq.to(tl.int64) * stride_q_seq
    q = tl.load(q_base + heads[:, None] * stride_q_head + dims[None, :], mask=head_valid[:, None], other=0.0)  # [BLOCK_G, D]
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    head_offset = kv_head * stride_cache_head

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_G], dtype=tl.float32)

    # Whole tiles inside the context need no mask; at most one ragged tile follows.
    full_end = tl.maximum(split_start, split_start + (split_end - split_start) // BLOCK_N * BLOCK_N)
    for start in range(split_start, full_end, BLOCK_N):
        keys = start + cols  # [BLOCK_N] positions in the sequence
        blocks = tl.load(table + keys // KV_BLOCK_SIZE).to(tl.int64)  # [BLOCK_N] physical block ids
        slots = blocks * stride_cache_block + (keys % KV_BLOCK_SIZE) * stride_cache_slot + head_offset  # [BLOCK_N] int64
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :])  # [BLOCK_N, D]
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :])  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    if full_end < split_end:
        keys = full_end + cols  # [BLOCK_N]
        key_valid = keys < split_end  # [BLOCK_N]
        blocks = tl.load(table + keys // KV_BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)  # [BLOCK_N]
        slots = blocks * stride_cache_block + (keys % KV_BLOCK_SIZE) * stride_cache_slot + head_offset  # [BLOCK_N]
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), None, DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, scores, v, qk_scale, DOT_PRECISION)

    if NUM_SPLITS == 1:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # [BLOCK_G, D]; empty context -> 0
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None])
    else:
        # partials are contiguous [B, Hq, NUM_SPLITS(, D)]
        row = (seq.to(tl.int64) * (QUERIES_PER_KV * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(partial_max_ptr + row, row_max, mask=head_valid)
        tl.store(partial_sum_ptr + row, row_sum, mask=head_valid)
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_valid[:, None])


@triton.jit
def _paged_decode_merge_kernel(
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] fp32
    partial_max_ptr,  # [B, Hq, NUM_SPLITS] fp32
    partial_sum_ptr,  # [B, Hq, NUM_SPLITS] fp32
    out_ptr,  # [B, Hq, D]
    stride_o_seq, stride_o_head,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,  # NUM_SPLITS rounded up to a power of two (tl.arange)
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_POW2)  # [S]
    split_valid = splits < NUM_SPLITS  # [S]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS  # first partial of this (seq, head)

    maxes = tl.load(partial_max_ptr + row + splits, mask=split_valid, other=float("-inf"))  # [S]
    sums = tl.load(partial_sum_ptr + row + splits, mask=split_valid, other=0.0)  # [S]
    outs = tl.load(partial_out_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :], mask=split_valid[:, None], other=0.0)  # [S, D]

    global_max = tl.max(maxes, 0)
    global_max = tl.where(global_max == float("-inf"), 0.0, global_max)  # empty context: every weight 0
    weights = tl.math.exp2(maxes - global_max)  # [S], 0 for empty splits
    total = tl.sum(sums * weights, 0)
    out = tl.sum(outs * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [D]
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_kv_heads: int, max_context_len: int, block_n: int, num_sms: int) -> int:
    """Enough programs for ~8 per SM (memory-bound work hides latency with many loads in flight),
    but at least 4 key tiles per split so the merge stays cheap."""
    programs = batch * num_kv_heads
    tiles = triton.cdiv(max(max_context_len, 1), block_n)
    wanted = triton.cdiv(8 * num_sms, programs)
    return max(1, min(wanted, tiles // 4))


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [B] int32, tokens in the cache including the new one
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [B, Hq, D]
    num_splits: int | None = None,  # split-K ranges per sequence; None = heuristic
    max_context_len: int | None = None,  # bound on context_lens; None = block table capacity
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context. Returns [B, Hq, D] in q's dtype.

    Trusted without a device sync: context_lens[b] <= max_context_len (or the block-table capacity)
    and the first cdiv(context_lens[b], block_size) table entries are valid block ids."""
    device = check_device({
        "q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
        "context_lens": context_lens, "out": out,
    })
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("q", q, {"k_cache": k_cache, "v_cache": v_cache})
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, head_dim] (one token per sequence), got shape {tuple(q.shape)}")
    check_last_dim_contiguous("q", q)
    batch, num_q_heads, head_dim = q.shape
    check_head_dim(head_dim)
    check_paged_cache(k_cache, v_cache, head_dim)
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    check_gqa(num_q_heads, num_kv_heads)
    check_index("block_tables", block_tables, dims=2)
    check_index("context_lens", context_lens, dims=1)
    if block_tables.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: q has {batch} sequences, block_tables {block_tables.shape[0]} rows, "
            f"context_lens {context_lens.shape[0]} entries"
        )
    check_scale(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
        check_last_dim_contiguous("out", out)
    if batch == 0:
        return out

    config = config or decode_config(device, q.dtype, head_dim)
    queries_per_kv = num_q_heads // num_kv_heads
    block_g = max(config.block_m, triton.next_power_of_2(queries_per_kv))
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        num_splits = choose_num_splits(batch, num_kv_heads, max_context_len, config.block_n, num_sms)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), config.block_n) * config.block_n

    if num_splits == 1:
        partial_out = partial_max = partial_sum = out  # unused by the NUM_SPLITS == 1 path
    else:
        partial_out = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device, dtype=torch.float32)
        partial_max = torch.empty(batch, num_q_heads, num_splits, device=device, dtype=torch.float32)
        partial_sum = torch.empty(batch, num_q_heads, num_splits, device=device, dtype=torch.float32)

    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, partial_out, partial_max, partial_sum,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        tokens_per_split,
        scale * LOG2_E,
        KV_BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        QUERIES_PER_KV=queries_per_kv,
        NUM_SPLITS=num_splits,
        BLOCK_G=block_g,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype, device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _paged_decode_merge_kernel[(batch, num_q_heads)](
            partial_out, partial_max, partial_sum, out,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_POW2=triton.next_power_of_2(num_splits),
            num_warps=1,
        )
    return out
