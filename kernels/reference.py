"""Plain-PyTorch references for every kernel in this package, written for clarity, not speed.

Each one takes the same arguments as its launcher and computes attention one sequence at a time in
fp32 (scores, softmax and the weighted sum), then casts the output back to the input dtype. Rows
that see no valid key at all produce zeros (the kernels do the same, instead of NaN).
These are what the kernel tests compare against.
"""

from __future__ import annotations

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of one sequence.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; visible: [Tq, Tk] bool (True = query may attend to key) or None.
    Query head h reads key/value head h // (Hq // Hkv) (GQA). Returns [Tq, Hq, D] in q's dtype.
    """
    queries_per_kv = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(queries_per_kv, dim=1)  # [Tk, Hq, D]
    v = v.float().repeat_interleave(queries_per_kv, dim=1)  # [Tk, Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [Hq, Tq, Tk]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: all -inf -> zeros
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)  # [Tq, Hq, D]


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """[q_len, k_len] bool, bottom-right aligned: query i sees keys j <= i + (k_len - q_len)."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + (k_len - q_len)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache.

    cache: [num_blocks, block_size, Hkv, D]; block_table: [max_blocks_per_seq] int. Returns [length, Hkv, D].
    """
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table.long()[positions // block_size]
    return cache[blocks, positions % block_size]


def reference_store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key, value: [N, Hkv, D] -> k_cache, v_cache: [num_blocks, block_size, Hkv, D] at slot_mapping [N].
    slot = block * block_size + offset; slot -1 marks a padding token that is not stored."""
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[token]
        v_cache[slot // block_size, slot % block_size] = value[token]


def reference_paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, max_seqlen_q=None, *, scale):
    """Causal attention of the new tokens q: [Nq, Hq, D] over each sequence's whole paged context."""
    out = torch.zeros_like(q)
    starts_q = cu_seqlens_q.tolist()
    for b, k_len in enumerate(seq_lens_k.tolist()):
        qs, qe = starts_q[b], starts_q[b + 1]
        k = gather_paged(k_cache, block_tables[b], k_len)
        v = gather_paged(v_cache, block_tables[b], k_len)
        out[qs:qe] = attention(q[qs:qe], k, v, causal_mask(qe - qs, k_len, q.device), scale)
    return out


def reference_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale):
    """One query per sequence, q: [B, Hq, D], over its paged context of context_lens[b] tokens."""
    out = torch.zeros_like(q)
    for b, k_len in enumerate(context_lens.tolist()):
        k = gather_paged(k_cache, block_tables[b], k_len)
        v = gather_paged(v_cache, block_tables[b], k_len)
        out[b] = attention(q[b : b + 1], k, v, None, scale)[0]
    return out


def reference_masked_attention(q, k, v, key_padding_mask, *, scale):
    """Bidirectional attention, q/k/v: [B, T, H, D]; key_padding_mask: [B, T] bool (True = valid key) or None."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        visible = None
        if key_padding_mask is not None:
            visible = key_padding_mask[b][None, :].expand(q.shape[1], -1)  # [T, T]: every query, valid keys
        out[b] = attention(q[b], k[b], v[b], visible, scale)
    return out
