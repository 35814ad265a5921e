"""Paged attention of the engine (store + attend) against the plain references of `smolvlm_kernels`,
on random caches: decode-only, prefill-only and mixed steps, even and very uneven context lengths,
GQA, shuffled (non-contiguous) block tables."""

from __future__ import annotations

import random

import pytest
import torch

from smolvlm.engine.attention import AttentionMetadata, PagedAttention, TorchBackend
from smolvlm_kernels.reference import reference_paged_prefill_attention

HQ, HKV, D, BS, NUM_BLOCKS = 6, 2, 16, 4, 128


class FakeCache:
    """One layer's cache, the KVCache interface PagedAttention uses."""

    def __init__(self, generator):
        self.k = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=generator)
        self.v = torch.randn(NUM_BLOCKS, BS, HKV, D, generator=generator)
        self.block_size = BS

    def layer(self, layer_idx):
        return self.k, self.v


def make_step(query_lens, context_lens, rng):
    """Metadata for sequences with `context_lens[b]` tokens in all, the last `query_lens[b]` of them new."""
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    tables, slots = [], []
    for q_len, k_len in zip(query_lens, context_lens):
        n = (k_len + BS - 1) // BS
        table, blocks = blocks[:n], blocks[n:]
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(k_len - q_len, k_len)]
    return AttentionMetadata.build(slots, tables, query_lens, context_lens, torch.device("cpu"))


@pytest.mark.parametrize(
    "query_lens, context_lens",
    [
        pytest.param([1], [13], id="one-decode"),
        pytest.param([1, 1, 1], [9, 12, 7], id="even-decodes"),  # padded batch path
        pytest.param([1, 1, 1], [3, 300, 5], id="uneven-decodes"),  # one sequence at a time
        pytest.param([11], [11], id="fresh-prefill"),
        pytest.param([5], [21], id="prefill-after-cached-prefix"),
        pytest.param([1, 1, 7, 4], [30, 6, 7, 18], id="mixed"),
    ],
)
def test_paged_attention_matches_the_reference(query_lens, context_lens):
    generator = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    cache = FakeCache(generator)
    metadata = make_step(query_lens, context_lens, rng)
    n = sum(query_lens)
    q = torch.randn(n, HQ, D, generator=generator)
    k = torch.randn(n, HKV, D, generator=generator)
    v = torch.randn(n, HKV, D, generator=generator)
    scale = D**-0.5

    k_ref, v_ref = cache.k.clone(), cache.v.clone()
    out = PagedAttention(cache, metadata, TorchBackend())(0, q, k, v, scale)

    # the new K/V landed in their slots, nothing else moved
    k_ref.view(-1, HKV, D)[metadata.slot_mapping] = k
    v_ref.view(-1, HKV, D)[metadata.slot_mapping] = v
    assert torch.equal(cache.k, k_ref) and torch.equal(cache.v, v_ref)
    expected = reference_paged_prefill_attention(
        q, k_ref, v_ref, metadata.block_tables, metadata.cu_seqlens_q, metadata.seq_lens, scale=scale
    )
    worst = (out - expected).abs().max().item()
    assert worst < 1e-5, f"max abs diff {worst:.3g} vs the reference (query lens {query_lens}, contexts {context_lens})"
