"""Write the new tokens' keys and values into their slots of the paged KV cache.

Cache layout, one pair per decoder layer: [num_blocks, block_size, Hkv, D];
slot = block * block_size + offset. slot_mapping[i] is token i's slot, or -1 for a padding token
that must not be stored (it would overwrite someone else's cache line). One program copies the
[Hkv, D] key and value rows of one token. Slots are multiplied out in 64-bit: a pool of more than
2^31 elements is reachable with int32 slot numbers. Reference: reference.reference_store_kv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import (
    ATTENTION_DTYPES,
    check_device,
    check_dtype,
    check_index,
    check_last_dim_contiguous,
    check_paged_cache,
    check_same_dtype,
)


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [N, Hkv, D]
    value_ptr,  # [N, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,  # [N] int32 or int64, -1 = skip
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,  # shared by k_cache and v_cache
    KV_BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of two (tl.arange)
    HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_POW2)  # [H]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    mask = (heads < NUM_KV_HEADS)[:, None]  # [H, 1]

    key = tl.load(key_ptr + token.to(tl.int64) * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)  # [H, D]
    value = tl.load(value_ptr + token.to(tl.int64) * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask)
    cache_offsets = (
        (slot // KV_BLOCK_SIZE) * stride_cache_block + (slot % KV_BLOCK_SIZE) * stride_cache_slot  # int64 scalar
        + heads[:, None] * stride_cache_head + dims[None, :]  # [H, D]
    )
    tl.store(k_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, value, mask=mask)


def store_kv(
    key: torch.Tensor,  # [N, Hkv, D]
    value: torch.Tensor,  # [N, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [N] int32 or int64; -1 = padding token, not stored
) -> None:
    """Store each token's key/value rows at its cache slot. Slots must be < num_blocks * block_size
    (trusted, not checked on the device) and distinct among non-padding tokens."""
    check_device({"key": key, "value": value, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping})
    check_dtype("key", key, ATTENTION_DTYPES)
    check_same_dtype("k_cache", k_cache, {"key": key, "value": value, "v_cache": v_cache})
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, kv_heads, head_dim], got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    num_tokens, num_kv_heads, head_dim = key.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two")
    check_paged_cache(k_cache, v_cache, head_dim)
    if k_cache.shape[2] != num_kv_heads:
        raise ValueError(f"key has {num_kv_heads} kv heads but the cache has {k_cache.shape[2]}")
    check_index("slot_mapping", slot_mapping, dims=1, allowed=(torch.int32, torch.int64))
    if slot_mapping.numel() != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.numel()} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return

    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_BLOCK_SIZE=k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        num_warps=1,
    )
