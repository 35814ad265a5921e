"""Triton kernels against their plain-PyTorch references (smolvlm_kernels.reference).

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), so
CI checks the real kernel code, only slowly: shapes here stay small but cover every path (several
query/key tiles, ragged last tiles, GQA and MHA, single tokens, mixed batches, block sizes 16 and
32, split-K, padding slots, a cache pool beyond 32-bit element offsets). On a GPU the same tests
run compiled, and the `gpu`-marked tests add the model's real shapes.

Tolerances, absolute and relative (torch.testing style), per input dtype:
- fp32: the kernels use exact fp32 dots ("ieee"); only summation order differs: 2e-5.
- fp16 / bf16: as in flash attention, the probabilities are rounded to the input dtype before the
  P @ V product (relative error 2^-11 / 2^-8 per weight) and the output is rounded once more; we
  allow 4 units in the last place at 1.0 of the dtype: fp16 4e-3, bf16 3.2e-2 per element. Over
  the whole tensor, the relative Frobenius error must stay under 2 unit roundoffs (2^-10 for
  fp16, 2^-7 for bf16): each of the two roundings contributes well under one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

import smolvlm_kernels as K  # noqa: E402
from smolvlm_kernels import reference as R  # noqa: E402
from smolvlm_kernels.paged_decode_attention import choose_num_splits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}  # per element, abs and rel
RELATIVE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # whole tensor
HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Fails with the max abs diff, where it is, and the values there."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    out32, ref32 = out.float(), ref.float()
    assert not out32.isnan().any(), f"{name}: NaN at {out32.isnan().nonzero()[:5].tolist()} (unwritten output or masking bug)"
    tol = TOLERANCE[out.dtype]
    diff = (out32 - ref32).abs()
    where = torch.unravel_index(diff.argmax(), diff.shape)
    where = tuple(int(i) for i in where)
    bad = diff > tol + tol * ref32.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements off; max abs diff {diff.max().item():.3g} at {where} "
        f"(kernel {out32[where].item():.6g}, reference {ref32[where].item():.6g}, tolerance {tol})"
    )
    relative = (out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)
    bound = RELATIVE_TOLERANCE[out.dtype]
    assert relative < bound, f"{name}: relative Frobenius error {relative.item():.3g} >= {bound:.3g}"


def randn(*shape, dtype, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=DEVICE)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel forgets to write fails assert_close."""
    return torch.full_like(like, float("nan"))


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)


def paged_cache(num_blocks, block_size, num_kv_heads, dtype, generator):
    k_cache = randn(num_blocks, block_size, num_kv_heads, HEAD_DIM, dtype=dtype, generator=generator)
    v_cache = randn(num_blocks, block_size, num_kv_heads, HEAD_DIM, dtype=dtype, generator=generator)
    return k_cache, v_cache


def scattered_block_tables(context_lens: list[int], block_size: int, num_blocks: int, generator) -> torch.Tensor:
    """Each sequence gets distinct random blocks of the pool; unused table entries hold -1, so a
    kernel that reads past a sequence's context would fault or fail, not silently pass."""
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        count = -(-n // block_size)
        table[b, :count] = order[used : used + count].to(torch.int32)
        used += count
    assert used <= num_blocks, "test bug: pool too small"
    return table.to(DEVICE)


# ---------------------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_store_kv_writes_slots_and_skips_padding(dtype, block_size, slot_dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, num_kv_heads = 5, 3
    k_cache, v_cache = paged_cache(num_blocks, block_size, num_kv_heads, dtype, g)
    key = randn(7, num_kv_heads, HEAD_DIM, dtype=dtype, generator=g)
    value = randn(7, num_kv_heads, HEAD_DIM, dtype=dtype, generator=g)
    last = num_blocks * block_size - 1
    slots = torch.tensor([0, -1, block_size - 1, block_size, -1, 3 * block_size + 5, last], dtype=slot_dtype, device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    R.reference_store_kv(key, value, expected_k, expected_v, slots)
    K.store_kv(key, value, k_cache, v_cache, slots)
    # exact copies, and every other slot (padding tokens included) untouched
    assert torch.equal(k_cache, expected_k), f"k_cache differs at {(k_cache != expected_k).nonzero()[:5].tolist()}"
    assert torch.equal(v_cache, expected_v), f"v_cache differs at {(v_cache != expected_v).nonzero()[:5].tolist()}"


def test_store_kv_strided_inputs():
    """key/value as views of a fused [N, 2, Hkv, D] projection output (strided, last dim contiguous)."""
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = paged_cache(4, 16, 3, torch.float16, g)
    fused = randn(9, 2, 3, HEAD_DIM, dtype=torch.float16, generator=g)
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.tensor([63, 0, 1, 17, -1, 30, 31, 32, 5], dtype=torch.int32, device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    R.reference_store_kv(key, value, expected_k, expected_v, slots)
    K.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# -------------------------------------------------------------------------------- masked attention


def vision_padding_mask(batch, grid, valid_rows, valid_cols):
    """Valid patches of a padded image form a top-left rectangle of the patch grid (not a prefix)."""
    mask = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for b, (rows, cols) in enumerate(zip(valid_rows, valid_cols)):
        mask[b, :rows, :cols] = True
    return mask.view(batch, grid * grid).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padding-mask"])
def test_masked_attention(dtype, with_mask):
    g = torch.Generator().manual_seed(5)
    batch, grid, num_heads = 3, 7, 3  # T = 49 patches: not a multiple of any tile
    q, k, v = (randn(batch, grid * grid, num_heads, HEAD_DIM, dtype=dtype, generator=g) for _ in range(3))
    mask = vision_padding_mask(batch, grid, valid_rows=[7, 4, 1], valid_cols=[7, 6, 1]) if with_mask else None
    out = K.masked_attention(q, k, v, mask, scale=SCALE, out=poisoned(q))
    ref = R.reference_masked_attention(q, k, v, mask, scale=SCALE)
    assert_close(f"masked {dtype} mask={with_mask}", out, ref)


def test_masked_attention_tile_multiple_fused_views_and_empty_tile():
    """T = 64 (a multiple of the key tile: the unmasked EVEN_T path), q/k/v views of a fused
    [B, T, 3, H, D] tensor, and one tile whose keys are all padding: it must give zeros, not NaN."""
    g = torch.Generator().manual_seed(6)
    fused = randn(2, 64, 3, 2, HEAD_DIM, dtype=torch.float16, generator=g)
    q, k, v = fused.unbind(dim=2)
    for mask in (None, vision_padding_mask(2, 8, valid_rows=[3, 0], valid_cols=[5, 0])):
        out = K.masked_attention(q, k, v, mask, scale=SCALE)
        ref = R.reference_masked_attention(q, k, v, mask, scale=SCALE)
        assert_close(f"masked fused views mask={mask is not None}", out, ref)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "an all-padding tile must give zeros"


# ------------------------------------------------------------------------- paged prefill attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3)], ids=["mha", "gqa"])
def test_paged_prefill_attention_mixed_batch(dtype, block_size, heads):
    """One launch over a mixed batch: decode (q_len 1), prefix-cached chunk, fresh prefill, and a
    one-token sequence. Context lengths are not multiples of the block size."""
    g = torch.Generator().manual_seed(7)
    num_q_heads, num_kv_heads = heads
    q_lens = [1, 23, 45, 1]
    context_lens = [37, 75, 45, 1]
    num_blocks = 24
    k_cache, v_cache = paged_cache(num_blocks, block_size, num_kv_heads, dtype, g)
    tables = scattered_block_tables(context_lens, block_size, num_blocks, g)
    q = randn(sum(q_lens), num_q_heads, HEAD_DIM, dtype=dtype, generator=g)
    cu_q = cu_seqlens(q_lens)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    out = K.paged_prefill_attention(q, k_cache, v_cache, tables, cu_q, seq_lens, max(q_lens), scale=SCALE, out=poisoned(q))
    ref = R.reference_paged_prefill_attention(q, k_cache, v_cache, tables, cu_q, seq_lens, scale=SCALE)
    assert_close(f"paged prefill {dtype} bs={block_size} heads={heads}", out, ref)


def test_paged_prefill_after_store_kv_matches_contiguous_attention():
    """The engine's path end to end: store the new tokens' K/V, then attend over the cache; equals
    causal attention (the plain-PyTorch reference, one sequence at a time) over the same K/V held
    contiguously, so a slot store_kv writes wrong or the gather reads wrong fails here."""
    g = torch.Generator().manual_seed(8)
    block_size, num_blocks, lens = 16, 12, [29, 50]
    k = randn(sum(lens), 3, HEAD_DIM, dtype=torch.float32, generator=g)
    v = randn(sum(lens), 3, HEAD_DIM, dtype=torch.float32, generator=g)
    q = randn(sum(lens), 9, HEAD_DIM, dtype=torch.float32, generator=g)
    k_cache = torch.zeros(num_blocks, block_size, 3, HEAD_DIM, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    tables = scattered_block_tables(lens, block_size, num_blocks, g)
    slots = torch.cat([
        tables[b, torch.arange(n, device=DEVICE) // block_size].long() * block_size + torch.arange(n, device=DEVICE) % block_size
        for b, n in enumerate(lens)
    ])
    K.store_kv(k, v, k_cache, v_cache, slots)
    cu = cu_seqlens(lens)
    paged = K.paged_prefill_attention(q, k_cache, v_cache, tables, cu, torch.tensor(lens, dtype=torch.int32, device=DEVICE), max(lens), scale=SCALE)
    starts = cu.tolist()
    contiguous = torch.cat([
        R.attention(q[s:e], k[s:e], v[s:e], R.causal_mask(e - s, e - s, DEVICE), SCALE) for s, e in zip(starts[:-1], starts[1:])
    ])
    assert_close("paged prefill after store_kv vs contiguous attention", paged, contiguous)


# -------------------------------------------------------------------------- paged decode attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "split-k"])
def test_paged_decode_attention(dtype, block_size, num_splits):
    g = torch.Generator().manual_seed(9)
    context_lens = [1, 16, 33, 130]  # one token, exactly one block, ragged, several tiles
    num_blocks = 24
    k_cache, v_cache = paged_cache(num_blocks, block_size, 3, dtype, g)
    tables = scattered_block_tables(context_lens, block_size, num_blocks, g)
    q = randn(len(context_lens), 9, HEAD_DIM, dtype=dtype, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    out = K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE, num_splits=num_splits, out=poisoned(q))
    ref = R.reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE)
    assert_close(f"decode {dtype} bs={block_size} splits={num_splits}", out, ref)


def test_paged_decode_mha_long_context_more_splits_than_needed():
    """MHA, a 1,000-token context next to a 3-token one: with 8 splits the short sequence has
    empty splits, which the merge must ignore."""
    g = torch.Generator().manual_seed(10)
    context_lens = [1000, 3]
    k_cache, v_cache = paged_cache(70, 16, 2, torch.float16, g)
    tables = scattered_block_tables(context_lens, 16, 70, g)
    q = randn(2, 2, HEAD_DIM, dtype=torch.float16, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    ref = R.reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE)
    for splits in (8, None):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE, num_splits=splits)
        assert_close(f"decode long splits={splits}", out, ref)


def test_paged_decode_wide_query_group():
    """20 query heads on one KV head: the group no longer fits the 16-row minimum tile (BLOCK_G = 32)."""
    g = torch.Generator().manual_seed(14)
    context_lens = [45, 3]
    k_cache, v_cache = paged_cache(8, 16, 1, torch.float16, g)
    tables = scattered_block_tables(context_lens, 16, 8, g)
    q = randn(2, 20, HEAD_DIM, dtype=torch.float16, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    ref = R.reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE)
    for splits in (1, 2):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE, num_splits=splits, out=poisoned(q))
        assert_close(f"decode 20 query heads per kv head, splits={splits}", out, ref)


def test_decode_equals_paged_prefill_with_one_query():
    g = torch.Generator().manual_seed(11)
    context_lens = [50, 7, 16]
    k_cache, v_cache = paged_cache(10, 16, 3, torch.float32, g)
    tables = scattered_block_tables(context_lens, 16, 10, g)
    q = randn(3, 9, HEAD_DIM, dtype=torch.float32, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    decode = K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=SCALE, num_splits=2)
    prefill = K.paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens([1, 1, 1]), lens, 1, scale=SCALE)
    assert_close("decode vs prefill(q_len=1)", decode, prefill)


def test_choose_num_splits():
    # batch 64 x 3 kv heads x 4k tokens on 132 SMs: 6 splits -> 1,152 programs of ~11 tiles each
    assert choose_num_splits(64, 3, 4096, 64, 132) == 6
    assert choose_num_splits(1, 3, 4096, 64, 132) == 16  # capped: at least 4 tiles per split
    assert choose_num_splits(512, 3, 4096, 64, 132) == 1  # enough programs already
    assert choose_num_splits(4, 3, 10, 64, 132) == 1  # a short context is never split


# ------------------------------------------------------------------- 64-bit offsets in a huge pool


HUGE_BLOCK_SIZE, HUGE_KV_HEADS, HUGE_HEAD_DIM = 16, 1, 16
# 2^31 elements / (16 x 1 x 16 per block) = 8,388,608 blocks; a few more put the last blocks past
# 2^31 elements, where an int32 `block * stride` wraps around.
HUGE_NUM_BLOCKS = 2**31 // (HUGE_BLOCK_SIZE * HUGE_KV_HEADS * HUGE_HEAD_DIM) + 64


def huge_cache():
    """A 4.3 GB fp16 pool. torch.empty only reserves address space: on CPU the pages that are never
    written cost no memory, and the kernels touch only the few blocks the test uses."""
    try:
        return torch.empty(HUGE_NUM_BLOCKS, HUGE_BLOCK_SIZE, HUGE_KV_HEADS, HUGE_HEAD_DIM, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:  # e.g. strict overcommit, or a small GPU
        pytest.skip(f"cannot reserve a {HUGE_NUM_BLOCKS}-block pool: {error}")


def test_index_arithmetic_beyond_int32_offsets():
    g = torch.Generator().manual_seed(12)
    k_cache, v_cache = huge_cache(), huge_cache()
    assert k_cache.numel() > 2**31
    # two sequences whose blocks sit at the very end of the pool (element offsets > 2^31)
    context_lens = [40, 17]
    tables = torch.tensor([[HUGE_NUM_BLOCKS - 1, HUGE_NUM_BLOCKS - 5, HUGE_NUM_BLOCKS - 3], [HUGE_NUM_BLOCKS - 2, HUGE_NUM_BLOCKS - 4, -1]], dtype=torch.int32, device=DEVICE)
    slots = torch.cat([
        tables[b, torch.arange(n, device=DEVICE) // HUGE_BLOCK_SIZE].long() * HUGE_BLOCK_SIZE + torch.arange(n, device=DEVICE) % HUGE_BLOCK_SIZE
        for b, n in enumerate(context_lens)
    ]).to(torch.int32)
    assert int(slots.max()) * HUGE_HEAD_DIM > 2**31
    key = randn(sum(context_lens), HUGE_KV_HEADS, HUGE_HEAD_DIM, dtype=torch.float16, generator=g)
    value = randn(sum(context_lens), HUGE_KV_HEADS, HUGE_HEAD_DIM, dtype=torch.float16, generator=g)
    K.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, HUGE_KV_HEADS, HUGE_HEAD_DIM)[slots.long()], key), "store_kv missed the high slots"
    assert torch.equal(v_cache.view(-1, HUGE_KV_HEADS, HUGE_HEAD_DIM)[slots.long()], value), "store_kv missed the high slots"

    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = randn(2, 2, HUGE_HEAD_DIM, dtype=torch.float16, generator=g)
    ref = R.reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.25)
    for splits in (1, 2):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.25, num_splits=splits)
        assert_close(f"decode in a huge pool, splits={splits}", out, ref)
    q_lens = [9, 17]
    qp = randn(sum(q_lens), 2, HUGE_HEAD_DIM, dtype=torch.float16, generator=g)
    out = K.paged_prefill_attention(qp, k_cache, v_cache, tables, cu_seqlens(q_lens), lens, max(q_lens), scale=0.25)
    ref = R.reference_paged_prefill_attention(qp, k_cache, v_cache, tables, cu_seqlens(q_lens), lens, scale=0.25)
    assert_close("paged prefill in a huge pool", out, ref)


# ---------------------------------------------------------------------------------- input checks


def _decode_inputs():
    q = torch.zeros(2, 9, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    cache = torch.zeros(4, 16, 3, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    return q, cache, cache.clone(), tables, lens


@pytest.mark.parametrize(
    "change, error, names",
    [
        (lambda a: {**a, "q": a["q"].float()}, TypeError, "k_cache"),
        (lambda a: {**a, "block_tables": a["block_tables"].long()}, TypeError, "block_tables"),
        (lambda a: {**a, "context_lens": a["context_lens"][:1]}, ValueError, "context_lens"),
        (lambda a: {**a, "q": a["q"][:, :8]}, ValueError, "query heads"),
        (lambda a: {**a, "q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError, "q must have stride 1"),
        (lambda a: {**a, "v_cache": a["v_cache"][:, :8]}, ValueError, "v_cache"),
        (lambda a: {**a, "q": a["q"][..., :48]}, ValueError, "head_dim 48"),
        (lambda a: {**a, "scale": -1.0}, ValueError, "scale"),
    ],
    ids=["dtype-mismatch", "int64-table", "batch-mismatch", "gqa", "strides", "cache-shape", "head-dim", "scale"],
)
def test_decode_launcher_rejects_bad_inputs(change, error, names):
    q, k_cache, v_cache, tables, lens = _decode_inputs()
    args = change({"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables, "context_lens": lens, "scale": SCALE})
    with pytest.raises(error, match=names):
        K.paged_decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("block_tables"), args.pop("context_lens"), **args)


def test_paged_prefill_launcher_rejects_bad_inputs():
    q = torch.zeros(10, 9, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    cache = torch.zeros(4, 16, 3, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        K.paged_prefill_attention(q, cache, cache, tables, cu.long(), lens, 10, scale=SCALE)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        K.paged_prefill_attention(q, cache, cache, tables, torch.tensor([0], dtype=torch.int32, device=DEVICE), lens, 10, scale=SCALE)
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="all inputs must share a device"):
            K.paged_prefill_attention(q, cache, cache.cpu(), tables, cu, lens, 10, scale=SCALE)


def test_masked_and_store_launchers_reject_bad_inputs():
    x = torch.zeros(2, 8, 3, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    with pytest.raises(TypeError, match="key_padding_mask"):
        K.masked_attention(x, x, x, torch.ones(2, 8, device=DEVICE), scale=SCALE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        K.masked_attention(x, x, x, torch.ones(2, 9, dtype=torch.bool, device=DEVICE), scale=SCALE)
    with pytest.raises(ValueError, match="k has shape"):
        K.masked_attention(x, x[:, :7], x, None, scale=SCALE)
    cache = torch.zeros(4, 16, 3, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    key = torch.zeros(5, 3, HEAD_DIM, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="slot_mapping"):
        K.store_kv(key, key, cache, cache.clone(), torch.zeros(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="slot_mapping"):
        K.store_kv(key, key, cache, cache.clone(), torch.zeros(5, dtype=torch.float32, device=DEVICE))
    with pytest.raises(TypeError, match="key"):
        K.store_kv(key.float(), key.float(), cache, cache.clone(), torch.zeros(5, dtype=torch.int32, device=DEVICE))


def test_installed_name_does_not_shadow_hugging_face_kernels():
    """The folder is kernels/ but installs as smolvlm_kernels: transformers probes
    find_spec("kernels") for Hugging Face's own package and must not find ours."""
    spec = importlib.util.find_spec("kernels")
    ours = os.path.dirname(K.__file__)
    assert spec is None or os.path.dirname(spec.origin or "") != ours, f"'kernels' resolves to our package at {ours}"


# --------------------------------------------------------------------- GPU: the model's real shapes


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_real_shapes(dtype):
    """Vision tower (17 tiles x 1,024 patches, 12 heads), a prefix-cached paged prefill, and
    batch-64 decode over ~4.5k-token video contexts."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (randn(17, 1024, 12, HEAD_DIM, dtype=dtype, generator=g) for _ in range(3))
    mask = vision_padding_mask(17, 32, valid_rows=[32] * 16 + [20], valid_cols=[32] * 16 + [27])
    assert_close("gpu masked", K.masked_attention(q, k, v, mask, scale=SCALE), R.reference_masked_attention(q, k, v, mask, scale=SCALE))

    for block_size in (16, 32):
        context_lens = [4500, 4096, 1127, 77] * 16  # batch 64
        num_blocks = sum(-(-n // block_size) for n in context_lens) + 8
        k_cache, v_cache = paged_cache(num_blocks, block_size, 3, dtype, g)
        tables = scattered_block_tables(context_lens, block_size, num_blocks, g)
        seq_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
        qd = randn(64, 9, HEAD_DIM, dtype=dtype, generator=g)
        ref = R.reference_paged_decode_attention(qd, k_cache, v_cache, tables, seq_lens, scale=SCALE)
        for splits in (None, 1):
            out = K.paged_decode_attention(qd, k_cache, v_cache, tables, seq_lens, scale=SCALE, num_splits=splits)
            assert_close(f"gpu decode bs={block_size} splits={splits}", out, ref)
        q_lens = [500, 1, 1127, 77] * 2  # chunks of the first 8 sequences
        qp = randn(sum(q_lens), 9, HEAD_DIM, dtype=dtype, generator=g)
        args = (qp, k_cache, v_cache, tables[:8], cu_seqlens(q_lens), seq_lens[:8])
        out = K.paged_prefill_attention(*args, max(q_lens), scale=SCALE)
        assert_close(f"gpu paged prefill bs={block_size}", out, R.reference_paged_prefill_attention(*args, scale=SCALE))
