"""The CPU decode kernels (kernels/cpu/cpu_kernels.c via smolvlm_cpu_kernels.CpuKernels) against the
PyTorch code they replace: F.linear, ops.rms_norm, ops.apply_rotary, TorchBackend.store_kv / decode
(and the plain paged-decode reference), then the engine with the kernels on vs off.

Every kernel test runs twice: on the native build (AVX-512 paths where this CPU has AVX-512) and on
the generic build (-DSMOLVLM_GENERIC: the portable C paths a CPU without AVX-512 runs).

Tolerances: fp32 results may differ from PyTorch's only by the order of the sums (bounded by a few
fp32 epsilons times sqrt(K) times the sum of |terms|); bf16 results are compared with the fp32 math on
the same bf16 values and must be correctly rounded up to that summation noise (<= 2^-8 relative, half
a bf16 ulp); the elementwise kernels (rotary) must be bit-identical; end to end, bf16 decode with the
kernels is compared with a reference that performs the kernels' roundings (fp32 arithmetic on the bf16
values, each op's output rounded once), never with PyTorch's own bf16 kernels, whose roundings differ
from CPU to CPU.
"""

from __future__ import annotations

import collections
import ctypes
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conversations import user
from parity import max_abs_diff
from smolvlm import SmolVLM
from smolvlm.engine import Engine, SamplingParams
from smolvlm.engine.attention import AttentionMetadata, CpuBackend, PagedAttention, TorchBackend
from smolvlm.engine.config import EngineConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.ops import KernelOps, TorchOps, apply_rotary
from smolvlm.processing import Processor
from smolvlm.text import RMSNorm, RotaryEmbedding
from smolvlm_cpu_kernels import CpuKernels, CpuKernelsUnavailable, build
from smolvlm_kernels.reference import reference_paged_decode_attention, reference_store_kv

BF16_HALF_ULP = 2.0**-8  # round-to-nearest bf16: |rounded - exact| <= 2^-8 |exact|
BF16_MARGIN = 1.25  # our bf16 error vs fp32 <= 1.25 x that of a reference with the same roundings
KERNEL_METHODS = ("matvec", "rms_norm", "rotary", "store_kv", "paged_decode_attention")  # the per-op path
FUSED_METHODS = ("matvec", "decoder_layer")  # decode steps with whole layers in one call (and the LM head)


@pytest.fixture(params=["fused", "per-op"])
def fusion(request, monkeypatch) -> str:
    """Decode steps with KernelOps.decoder_layer (whole layers in one C call), or op by op (the layer
    kernel switched off): both are the engine's C path, and both are checked."""
    if request.param == "per-op":
        monkeypatch.setattr(KernelOps, "decoder_layer", TorchOps.decoder_layer)
    return request.param


@pytest.fixture(scope="module", params=["native", "generic"])
def kernels(request) -> CpuKernels:
    built = CpuKernels.load(generic=request.param == "generic")
    if request.param == "generic":
        assert not built.avx512, "the generic build still has the AVX-512 paths"
    return built


def test_native_build_uses_avx512_exactly_when_the_cpu_has_it():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert CpuKernels.load(generic=False).avx512 == ("avx512f" in flags)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def describe(ours: torch.Tensor, ref: torch.Tensor) -> str:
    worst, where = max_abs_diff(ours, ref)
    return (f"max abs diff {worst:.3g} at {where} (ours {float(ours[where]):.8g}, reference "
            f"{float(ref[where]):.8g}; reference max |x| {float(ref.float().abs().max()):.4g})")


def assert_within(name: str, ours: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Elementwise |ours - ref| <= bound; the message names the worst element relative to its bound."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref.double()).abs()
    excess = err - bound.double()
    if bool((excess > 0).any()):
        flat = int(excess.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {err.numel()} elements out of bounds; worst at {where}: ours "
            f"{float(ours[where]):.8g}, reference {float(ref[where]):.8g}, |diff| {float(err[where]):.3g} > bound "
            f"{float(bound[where]):.3g}; overall {describe(ours, ref)}"
        )


def fp32_sum_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reordering noise of fp32 dot products: 8 eps * sqrt(K) * sum_k |x_k w_k| (|x| @ |w|^T, in fp64)."""
    k = x.shape[-1]
    return 8 * 2.0**-24 * k**0.5 * (x.double().abs() @ w.double().abs().T) + 1e-30


# ---------------------------------------------------------------------------------------------
# matvec
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [37, 64, 576, 1536])
def test_matvec_fp32_matches_linear(kernels, k):
    g = gen(k)
    for n in (1, 5, 7, 960):
        w = torch.randn(n, k, generator=g)
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, k, generator=g) * 3
            out = kernels.matvec(x, w)
            assert out.dtype == torch.float32 and out.shape == (m, n)
            assert_within(f"fp32 matvec M={m} N={n} K={k}", out, F.linear(x, w), fp32_sum_bound(x, w))
    # leading dims, and a non-contiguous x (every other column of a wider tensor)
    w = torch.randn(7, k, generator=g)
    x = torch.randn(2, 3, k, generator=g)
    out = kernels.matvec(x, w)
    assert out.shape == (2, 3, 7)
    assert_within(f"fp32 matvec x (2, 3, {k})", out, F.linear(x, w), fp32_sum_bound(x.reshape(-1, k), w).view(2, 3, 7))
    wide = torch.randn(3, 2 * k, generator=g)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    assert_within("fp32 matvec, strided x", kernels.matvec(x, w), F.linear(x, w), fp32_sum_bound(x, w))


def test_matvec_mixed_dtypes(kernels):
    g = gen(1)
    for k, n, m in ((37, 7, 3), (576, 960, 1), (1536, 576, 8)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(m, k, generator=g)
        # bf16 weight, fp32 x: the weights convert exactly, so this is the fp32 product
        out = kernels.matvec(x, w)
        assert out.dtype == torch.float32
        assert_within(f"bf16 w @ fp32 x, K={k}", out, F.linear(x, w.float()), fp32_sum_bound(x, w.float()))
        # fp32 weight, bf16 x: output in bf16, the fp32 product rounded once
        xb, wf = x.bfloat16(), w.float() + torch.randn(n, k, generator=g) * 1e-3  # wf not bf16-representable
        out = kernels.matvec(xb, wf)
        assert out.dtype == torch.bfloat16
        ref = F.linear(xb.double(), wf.double())
        assert_within(f"fp32 w @ bf16 x, K={k}", out, ref, BF16_HALF_ULP * ref.abs() + fp32_sum_bound(xb, wf))


@pytest.mark.parametrize("k", [37, 576, 1536])
def test_matvec_bf16_is_correctly_rounded(kernels, k):
    g = gen(100 + k)
    w = torch.randn(960, k, generator=g).bfloat16()
    for m in (1, 3, 8):
        x = (torch.randn(m, k, generator=g) * 2).bfloat16()
        ref = F.linear(x.double(), w.double())  # the exact product of the same bf16 values
        ours = kernels.matvec(x, w)
        assert ours.dtype == torch.bfloat16
        # one rounding of the fp32 sum: half an ulp (2^-8 relative), plus the fp32 summation noise
        assert_within(f"bf16 matvec M={m} K={k}", ours, ref, BF16_HALF_ULP * ref.abs() + fp32_sum_bound(x, w))
        theirs = F.linear(x, w)
        ours_err, their_err = (ours.double() - ref).abs(), (theirs.double() - ref).abs()
        for stat in ("max", "mean"):
            a, b = float(getattr(ours_err, stat)()), float(getattr(their_err, stat)())
            assert a <= BF16_MARGIN * b + 1e-6, f"bf16 matvec M={m} K={k}: {stat} error {a:.4g} vs torch's {b:.4g}"


def test_matvec_rejects_bad_inputs(kernels):
    w = torch.randn(5, 16)
    with pytest.raises(TypeError, match="float16"):
        kernels.matvec(torch.randn(2, 16).half(), w)
    with pytest.raises(TypeError):
        kernels.matvec(torch.randn(2, 16), w.half())
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.matvec(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.matvec(torch.randn(2, 16), w[None])
    square = torch.randn(16, 16)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matvec(torch.randn(2, 16), square.t())


def test_accepts_rows(kernels):
    w = torch.randn(5, 16)
    assert kernels.max_rows == 8
    assert kernels.accepts(torch.randn(8, 16), w)
    assert kernels.accepts(torch.randn(2, 4, 16), w)
    assert kernels.accepts(torch.randn(1, 16).bfloat16(), w.bfloat16())
    assert not kernels.accepts(torch.randn(9, 16), w)
    assert not kernels.accepts(torch.randn(3, 3, 16), w)
    assert not kernels.accepts(torch.randn(1, 16).half(), w)
    assert not kernels.accepts(torch.randn(1, 16), w.half())
    assert not kernels.accepts(torch.randn(1, 16), torch.randn(16, 5).t())  # non-contiguous weight
    # smolvlm.ops.KernelOps routes accepted products to the kernel and the rest to PyTorch
    ops = KernelOps(kernels)
    x9 = torch.randn(9, 16)
    assert torch.equal(ops.linear(x9, w), F.linear(x9, w))
    x1 = torch.randn(1, 16)
    assert torch.equal(ops.linear(x1, w), kernels.matvec(x1, w))
    wt = torch.randn(16, 5).t()  # a non-contiguous weight goes to PyTorch instead of failing
    assert torch.equal(ops.linear(x1, wt), F.linear(x1, wt))
    trainable = w.clone().requires_grad_()  # the kernels compute no gradient: the reference does
    y = ops.linear(x1, trainable)
    assert y.requires_grad and torch.equal(y.detach(), F.linear(x1, w))


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


def _rms_norm_pair(kernels, x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return kernels.rms_norm(x, norm.weight, eps), norm(x)  # the module with its default ops: the reference


@pytest.mark.parametrize("k", [37, 576])
def test_rms_norm_fp32(kernels, k):
    g = gen(200 + k)
    weight = torch.randn(k, generator=g)
    for rows in range(1, 9):
        x = torch.randn(rows, k, generator=g) * 4 + 1
        ours, ref = _rms_norm_pair(kernels, x, weight, 1e-5)
        assert ours.dtype == torch.float32
        assert_within(f"fp32 rms_norm rows={rows} K={k}", ours, ref, 1e-6 * ref.abs() + 1e-30)
    x = torch.randn(2, 3, k, generator=g)  # leading dims
    ours, ref = _rms_norm_pair(kernels, x, weight, 1e-6)
    assert_within(f"fp32 rms_norm x (2, 3, {k})", ours, ref, 1e-6 * ref.abs() + 1e-30)
    tiny = torch.full((1, k), 1e-4)  # eps matters: mean(x^2) = 1e-8 << eps
    ours, ref = _rms_norm_pair(kernels, tiny, weight, 1e-5)
    assert_within("fp32 rms_norm, x^2 below eps", ours, ref, 1e-6 * ref.abs() + 1e-30)


@pytest.mark.parametrize("k", [37, 576])
def test_rms_norm_bf16(kernels, k):
    g = gen(300 + k)
    weight = torch.randn(k, generator=g).bfloat16()
    total = same = 0
    for rows in range(1, 9):
        x = (torch.randn(rows, k, generator=g) * 4 + 1).bfloat16()
        ours, ref = _rms_norm_pair(kernels, x, weight, 1e-5)
        assert ours.dtype == torch.bfloat16
        # at most one bf16 ulp apart (an ulp is <= 2^-7 of the value)
        assert_within(f"bf16 rms_norm rows={rows} K={k}", ours, ref.float(), 2.0**-7 * ref.float().abs())
        total += ours.numel()
        same += int((ours == ref).sum())
    assert same >= 0.99 * total, f"bf16 rms_norm K={k}: only {same} of {total} elements identical to RMSNorm"


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_is_bit_exact(kernels, dtype):
    hq, hkv, d = 9, 3, 64
    g = gen(400)
    rope = RotaryEmbedding(d, 100000.0)
    for n in (1, 3, 8):
        qkv = (torch.randn(n, hq + 2 * hkv, d, generator=g) * 3).to(dtype)  # (N, Hq+2Hkv, D) as the fused product
        before = qkv.clone()
        positions = torch.randint(0, 8192, (n,), generator=g)
        cos, sin = rope(positions, dtype)
        for name, x in (("q and k heads", qkv[:, : hq + hkv, :]), ("k heads", qkv[:, hq : hq + hkv, :]),
                        ("contiguous", qkv[:, :hq, :].contiguous())):
            assert kernels.accepts_rotary(x, cos)
            ours = kernels.rotary(x, cos, sin)
            ref = apply_rotary(x, cos, sin)
            assert ours.dtype == dtype and ours.shape == x.shape
            assert torch.equal(ours, ref), f"rotary {dtype} N={n} {name}: {describe(ours, ref)}"
            # through KernelOps: the same
            assert torch.equal(KernelOps(kernels).rotary(x, cos, sin), ref)
        assert torch.equal(qkv, before), "rotary wrote into its input"


def test_accepts_rotary(kernels):
    cos = torch.randn(2, 64)
    assert kernels.accepts_rotary(torch.randn(2, 3, 64), cos)
    assert not kernels.accepts_rotary(torch.randn(1, 2, 3, 64), cos), "4-D (B, T, H, D) input"
    assert not kernels.accepts_rotary(torch.randn(9, 3, 64), torch.randn(9, 64)), "more than max_rows tokens"
    assert not kernels.accepts_rotary(torch.randn(2, 3, 64).bfloat16(), cos), "x and cos dtypes differ"
    assert not kernels.accepts_rotary(torch.randn(2, 64, 3).transpose(1, 2), cos), "heads not contiguous"


# ---------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------


def _caches(dtype, num_blocks=4, block_size=16, hkv=3, d=64):
    return (torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype),
            torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_store_kv_matches_torch_backend(kernels, dtype):
    g = gen(500)
    hq, hkv, d, n = 9, 3, 64, 5
    # k and v as the decoder hands them over: slices of the (N, Hq+2Hkv, D) fused rows (not contiguous)
    qkv = torch.randn(n, hq + 2 * hkv, d, generator=g).to(dtype)
    key, value = qkv[:, hq : hq + hkv, :], qkv[:, hq + hkv :, :]
    slots = torch.tensor([17, 3, 63, 40, 0])
    ours, ref = _caches(dtype), _caches(dtype)
    kernels.store_kv(key, value, *ours, slots)
    TorchBackend().store_kv(key, value, *ref, SimpleNamespace(slot_mapping=slots))
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.equal(ours[0].view(-1, hkv, d)[slots], key) and torch.equal(ours[1].view(-1, hkv, d)[slots], value)

    # slot -1: a padding token, skipped (as the reference in kernels/reference.py)
    slots = torch.tensor([5, -1, 20])
    ours, ref = _caches(dtype), _caches(dtype)
    kernels.store_kv(key[:3], value[:3], *ours, slots)
    reference_store_kv(key[:3], value[:3], *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert int((ours[0].view(-1, 3 * 64) != 0).any(1).sum()) == 2, "exactly the two real tokens' rows are written"


def test_store_kv_errors(kernels):
    g = gen(501)
    key, value = torch.randn(3, 3, 64, generator=g), torch.randn(3, 3, 64, generator=g)
    k_cache, v_cache = _caches(torch.float32)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.store_kv(key, value, k_cache, v_cache, torch.tensor([0, 1, num_slots]))  # the last slot is past the end
    assert not k_cache.any() and not v_cache.any(), "a failed store_kv wrote some rows"
    kernels.store_kv(key, value, k_cache, v_cache, torch.tensor([0, 1, num_slots - 1]))  # the last slot itself: fine
    assert torch.equal(k_cache.view(-1, 3, 64)[num_slots - 1], key[2])
    with pytest.raises(TypeError):
        kernels.store_kv(key, value, *_caches(torch.bfloat16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        kernels.store_kv(key, value, *_caches(torch.float32), torch.tensor([0, 1, 2], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# paged decode attention
# ---------------------------------------------------------------------------------------------


def plain_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """In fp64: for each sequence, its context gathered through the block table, softmax(q k^T scale) v."""
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        t = torch.arange(int(seq_lens[i]))
        blocks = block_tables[i].long()[t // block_size]
        k = k_cache[blocks, t % block_size].double()  # (T, Hkv, D)
        v = v_cache[blocks, t % block_size].double()
        for h in range(hq):
            kv_head = h // (hq // hkv)
            probs = torch.softmax(k[:, kv_head] @ q[i, h].double() * scale, dim=0)  # (T,)
            out[i, h] = probs @ v[:, kv_head]
    return out


def _paged_case(dtype, hq, hkv, d, block_size, lens, seed):
    """Caches with random values in the context slots and NaN everywhere else (never to be read), a
    shuffled block table (non-consecutive blocks, padded with 0 as the engine does)."""
    g = gen(seed)
    needed = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32)
    for i, n in enumerate(lens):
        own = [perm.pop() for _ in range(needed[i])]
        tables[i, : len(own)] = torch.tensor(own, dtype=torch.int32)
        t = torch.arange(n)
        blocks = torch.tensor(own)[t // block_size]
        k_cache[blocks, t % block_size] = torch.randn(n, hkv, d, generator=g) * 2
        v_cache[blocks, t % block_size] = torch.randn(n, hkv, d, generator=g)
    q = torch.randn(len(lens), hq, d, generator=g) * 2
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, torch.tensor(lens, dtype=torch.int32)


PAGED_SHAPES = [pytest.param(9, 3, 64, id="gqa-9-3-d64"), pytest.param(2, 2, 8, id="mha-2-d8")]


@pytest.mark.parametrize("hq,hkv,d", PAGED_SHAPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_attention(kernels, hq, hkv, d, block_size):
    scale = d**-0.5
    for lens in ([70], [1, 17, 70], [33, 5, 2]):
        for dtype in (torch.float32, torch.bfloat16):
            seed = hq * block_size + sum(lens)
            q, k_cache, v_cache, tables, seq_lens = _paged_case(dtype, hq, hkv, d, block_size, lens, seed)
            name = f"{dtype} Hq={hq} Hkv={hkv} D={d} block={block_size} lens={lens}"
            ours = kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
            assert ours.dtype == dtype and ours.shape == q.shape
            ref = plain_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
            if dtype == torch.float32:
                assert_within(name, ours, ref, torch.full_like(ref, 1e-5))
            else:  # the exact math on the same bf16 values, rounded once: half an ulp, plus fp32 noise
                assert_within(name, ours, ref, BF16_HALF_ULP * ref.abs() + 1e-5)
            # kernels/reference.py's paged decode reference (fp32 math, output in the input dtype): identical
            # up to fp32 noise in fp32, within one bf16 ulp in bf16
            package_ref = reference_paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale=scale)
            bound = torch.full(ours.shape, 1e-5)
            if dtype == torch.bfloat16:
                bound += 2.0**-7 * package_ref.float().abs()
            assert_within(name + " vs reference.py", ours.float(), package_ref.float(), bound)


@pytest.mark.parametrize("hq,hkv,d", PAGED_SHAPES)
def test_paged_decode_attention_matches_torch_backend(kernels, hq, hkv, d):
    """The function it replaces in the engine, with the engine's metadata (finite caches: the torch
    backend reads whole blocks and masks)."""
    g = gen(600)
    block_size, lens, num_blocks = 16, [1, 17, 70], 12
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    tables = torch.tensor([[7, 0, 0, 0, 0], [3, 10, 0, 0, 0], [11, 2, 9, 5, 1]], dtype=torch.int32)
    q = torch.randn(3, hq, d, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    metadata = AttentionMetadata.build([0, 0, 0], tables, [1, 1, 1], lens, torch.device("cpu"), seq_lens_tensor=seq_lens)
    ref = TorchBackend().decode(q, k_cache, v_cache, metadata, d**-0.5)
    ours = CpuBackend(kernels).decode(q, k_cache, v_cache, metadata, d**-0.5)
    assert_within(f"CpuBackend.decode vs TorchBackend.decode Hq={hq}", ours, ref, torch.full_like(ref, 1e-5))


def test_paged_decode_attention_errors(kernels):
    q, k_cache, v_cache, tables, seq_lens = _paged_case(torch.float32, 9, 3, 64, 16, [1, 17, 70], seed=7)
    num_blocks = k_cache.shape[0]
    args = (k_cache, v_cache)
    bad = tables.clone()
    bad[2, 4] = num_blocks  # the last block of the 70-token sequence
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_decode_attention(q, *args, bad, seq_lens, 0.125)
    bad = tables.clone()
    bad[1, 0] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_decode_attention(q, *args, bad, seq_lens, 0.125)
    with pytest.raises(RuntimeError, match="out of range"):  # longer than the block table holds
        kernels.paged_decode_attention(q, *args, tables, torch.tensor([1, 17, 16 * 5 + 1], dtype=torch.int32), 0.125)
    with pytest.raises(TypeError, match="int32"):
        kernels.paged_decode_attention(q, *args, tables.long(), seq_lens, 0.125)
    with pytest.raises(TypeError, match="int32"):
        kernels.paged_decode_attention(q, *args, tables, seq_lens.long(), 0.125)
    with pytest.raises(TypeError):
        kernels.paged_decode_attention(q.bfloat16(), *args, tables, seq_lens, 0.125)
    with pytest.raises(ValueError):  # 8 query heads over 3 KV heads
        kernels.paged_decode_attention(q[:, :8], *args, tables, seq_lens, 0.125)


def test_results_do_not_depend_on_the_thread_count(kernels):
    """matvec and decode attention split their work over threads by whole outputs: the same bits with
    1, 2 or 3 threads (so the model-level tests below may run single-threaded)."""
    g = gen(700)
    w = torch.randn(963, 576, generator=g).bfloat16()
    xs = [torch.randn(m, 576, generator=g) for m in (1, 3, 8)]
    attention_case = _paged_case(torch.float32, 9, 3, 64, 16, [1, 17, 70], seed=701)
    before = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs[threads] = ([kernels.matvec(x, w) for x in xs] + [kernels.matvec(x.bfloat16(), w) for x in xs]
                                + [kernels.paged_decode_attention(*attention_case, 0.125)])
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(outputs[1], outputs[threads])):
            assert torch.equal(a, b), f"output {i}: 1 vs {threads} threads: {describe(b, a)}"


@pytest.fixture
def one_thread():
    """The grafted-model tests run single-threaded: their kernels give the same bits at any thread count
    (test above), and on a busy 2-core machine every OpenMP region (PyTorch's and the kernels') waits
    for a descheduled thread, ~8 ms each, ~20x slower decode steps (measured: 0.5 s vs 10 s for 8 tokens)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def test_build_without_compiler_says_how_to_avoid_it():
    with pytest.raises(CpuKernelsUnavailable) as info:
        build(compiler="no-such-compiler-xyz")
    message = str(info.value)
    assert "no-such-compiler-xyz" in message and "cpu_kernels='torch'" in message, message
    with pytest.raises(CpuKernelsUnavailable, match="no-such-compiler-xyz"):
        CpuKernels.load(compiler="no-such-compiler-xyz")


def test_build_in_an_unwritable_cache_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache dir would be inside a file
    with pytest.raises(CpuKernelsUnavailable, match="XDG_CACHE_HOME"):
        build()


def test_build_caches_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    path = build()
    assert path.parent == tmp_path / "smolvlm" and path.is_file() and path.suffix == ".so", path
    assert list(path.parent.iterdir()) == [path], "the build left temporary files behind"
    mtime = path.stat().st_mtime_ns
    assert build() == path
    assert path.stat().st_mtime_ns == mtime, "the second build() recompiled"
    fresh = CpuKernels(ctypes.CDLL(str(path)))  # the library it built works
    x, w = torch.randn(2, 40), torch.randn(6, 40)
    assert_within("matvec from the fresh build", fresh.matvec(x, w), F.linear(x, w), fp32_sum_bound(x, w))


# ---------------------------------------------------------------------------------------------
# The engine, kernels on vs off
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each CpuKernels method (all instances), to prove the kernels did run."""
    calls = collections.Counter()
    for name in (*KERNEL_METHODS, "decoder_layer"):
        original = getattr(CpuKernels, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(CpuKernels, name, counted)
    return calls


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at new token {i}: {x} vs {y}"
    return f"lengths differ: {len(a)} vs {len(b)}"


def test_engine_tiny_kernels_on_and_off_agree(tiny_ckpt, photos, short_video, tmp_path, kernel_calls, fusion):
    image = tmp_path / "astronaut.png"
    photos["astronaut"].convert("RGB").save(image)
    conversations = [
        user("Write a long story about a cat and a dog."),
        user(("image", image), "What is in this picture?"),
        user(("video", short_video), "What happens in this video?"),
    ]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = {}
    for choice, backend in (("c", "cpu"), ("torch", "torch")):
        kernel_calls.clear()
        engine = Engine.from_pretrained(tiny_ckpt, attention_backend="auto", cpu_kernels=choice, num_kv_blocks=256)
        assert engine.backend.name == backend
        assert (engine.cpu_kernels is not None) == (choice == "c")
        # one batched call: decode steps of three rows (and, as prompts finish, fewer)
        results = engine.generate(conversations, params)
        for i, r in enumerate(results):
            assert r.error is None and len(r.token_ids) == 24, (i, r.error, len(r.token_ids))
        tokens[choice] = [r.token_ids for r in results]
        if choice == "c":
            used = FUSED_METHODS if fusion == "fused" else KERNEL_METHODS
            assert all(kernel_calls[m] > 0 for m in used), dict(kernel_calls)
            assert (kernel_calls["decoder_layer"] > 0) == (fusion == "fused"), dict(kernel_calls)
        else:
            assert sum(kernel_calls.values()) == 0, dict(kernel_calls)
    for i, (a, b) in enumerate(zip(tokens["c"], tokens["torch"])):
        assert a == b, f"conversation {i}: kernels vs torch: {first_difference(a, b)}"


def test_engine_config_errors(tiny_ckpt):
    model = SmolVLM.from_pretrained(tiny_ckpt)
    with pytest.raises(ValueError, match="cpu_kernels must be"):
        Engine(model, None, EngineConfig(cpu_kernels="bogus", num_kv_blocks=8))
    with pytest.raises(ValueError, match="attention_backend='cpu'"):
        Engine(model, None, EngineConfig(attention_backend="cpu", cpu_kernels="torch", num_kv_blocks=8))
    engine = Engine(model, None, EngineConfig(attention_backend="cpu", cpu_kernels="c", num_kv_blocks=8))
    assert engine.backend.name == "cpu"
    engine = Engine(model, None, EngineConfig(attention_backend="torch", cpu_kernels="c", num_kv_blocks=8))
    assert engine.backend.name == "torch" and engine.cpu_kernels is not None  # kernels for the products only


@pytest.fixture(scope="module")
def grafted_fp32(grafted_ckpt):
    return SmolVLM.from_pretrained(grafted_ckpt, dtype=torch.float32), Processor.from_pretrained(grafted_ckpt)


def test_engine_grafted_fp32_kernels_on_and_off_agree(grafted_fp32, kernel_calls, one_thread):
    model, processor = grafted_fp32
    conversation = user("Explain how photosynthesis works.")
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    results = {}
    for choice in ("c", "torch"):
        kernel_calls.clear()
        engine = Engine(model, processor, EngineConfig(cpu_kernels=choice, num_kv_blocks=16))
        [results[choice]] = engine.generate([conversation], params)
        assert (sum(kernel_calls.values()) > 0) == (choice == "c"), dict(kernel_calls)
    ours, theirs = results["c"], results["torch"]
    assert ours.token_ids == theirs.token_ids, (
        f"{first_difference(ours.token_ids, theirs.token_ids)}\nkernels: {ours.text!r}\ntorch: {theirs.text!r}"
    )
    assert "photosynthesis" in theirs.text.lower() or "light" in theirs.text.lower(), theirs.text


def stepwise_logits(model, backend, ops, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits of every position, computing one token per step over a paged KV cache (as decode steps:
    every product, norm and attention call has one row); blocks in reverse order. -> (T, vocab) fp32."""
    text = model.config.text
    num_blocks = (len(ids) + block_size - 1) // block_size
    cache = KVCache(text, num_blocks, block_size, model.dtype, "cpu")
    blocks = list(reversed(range(num_blocks)))
    out = []
    with torch.inference_mode():
        for t, token in enumerate(ids):
            slot = blocks[t // block_size] * block_size + t % block_size
            metadata = AttentionMetadata.build([slot], [blocks], [1], [t + 1], torch.device("cpu"))
            embeds = model.embed(torch.tensor([token]))  # (1, hidden)
            hidden = model.decode(embeds, torch.tensor([t]), PagedAttention(cache, metadata, backend), ops)
            out.append(model.logits(hidden, ops).float())
    return torch.cat(out)


class RoundOnceOps(TorchOps):
    """The kernels' arithmetic contract in plain PyTorch: bf16 inputs taken exactly to fp32, fp32
    sums, each product's output rounded once to bf16. (RMSNorm and RoPE are the reference ops, whose
    roundings the kernels keep.) No PyTorch bf16 kernel runs, so it computes the same on every CPU."""

    accumulate = torch.float32

    def linear(self, x, weight, bias=None):
        t = self.accumulate
        return F.linear(x.to(t), weight.to(t), None if bias is None else bias.to(t)).to(x.dtype)


class RoundOnceFp64Ops(RoundOnceOps):
    """The same roundings, sums in fp64: differs from RoundOnceOps only in how the sums round, which
    shows how far two same-rounding runs drift apart (bf16 roundings flip, and flips propagate)."""

    accumulate = torch.float64


class RoundOnceBackend(TorchBackend):
    """Decode attention in fp32 on the bf16 cache, output rounded once (the C kernel's contract)."""

    def decode(self, q, k_cache, v_cache, metadata, scale):
        return super().decode(q.float(), k_cache.float(), v_cache.float(), metadata, scale).to(q.dtype)


@pytest.fixture(scope="module")
def bf16_references(grafted_ckpt, grafted_fp32):
    """(ids, fp32 logits, the two same-rounding references, the bf16 model), computed once for the module."""
    fp32_model, processor = grafted_fp32
    text = ("The capital of France is Paris, and the capital of Germany is Berlin. The largest planet in the "
            "solar system is Jupiter, and the smallest planet, closest to the sun, is")
    ids = processor.tokenizer.encode(text, add_special_tokens=False)[:32]
    assert len(ids) == 32
    with torch.inference_mode():
        truth = fp32_model(torch.tensor([ids]))[0].float()  # (T, vocab): whole prompt, plain PyTorch
    model = SmolVLM.from_pretrained(grafted_ckpt, dtype=torch.bfloat16)
    references = [stepwise_logits(model, RoundOnceBackend(), ops, ids) for ops in (RoundOnceOps(), RoundOnceFp64Ops())]
    return ids, truth, references, model


def test_bf16_decode_with_kernels_is_as_accurate(bf16_references, kernels, kernel_calls, one_thread, fusion):
    """Real decoder weights, 32 tokens fed one per step (so every product, norm and attention call is a
    decode-sized one): bf16 logits with the kernels, and from two references with the same roundings
    (RoundOnceOps with fp32 sums, RoundOnceFp64Ops with fp64 sums), all against the fp32 model's logits.
    Same roundings but other summation orders give errors of one size: the kernels' error must stay
    within BF16_MARGIN of the larger reference error, whatever the CPU (no PyTorch bf16 kernel is
    involved). Measured on the grafted checkpoint (AMD EPYC, AVX2): max 0.78-0.99, mean 0.105-0.122 for all three.
    (The fp32 decode path with the kernels is checked token for token by the engine test above.)"""
    ids, truth, references, model = bf16_references
    kernel_calls.clear()
    with_kernels = stepwise_logits(model, CpuBackend(kernels), KernelOps(kernels), ids)
    assert all(kernel_calls[m] > 0 for m in (FUSED_METHODS if fusion == "fused" else KERNEL_METHODS)), dict(kernel_calls)

    assert torch.isfinite(with_kernels).all()
    ours_err = (with_kernels - truth).abs()
    ref_errs = [(r - truth).abs() for r in references]
    report = (f"bf16 logits error vs fp32 over {len(ids)} decode steps: with kernels max {float(ours_err.max()):.4g} "
              f"mean {float(ours_err.mean()):.4g}; same-rounding references (fp32 / fp64 sums) max "
              + " / ".join(f"{float(e.max()):.4g}" for e in ref_errs) + " mean "
              + " / ".join(f"{float(e.mean()):.4g}" for e in ref_errs))
    print(report)
    for stat in ("max", "mean"):
        ours = float(getattr(ours_err, stat)())
        envelope = max(float(getattr(e, stat)()) for e in ref_errs)
        assert ours <= BF16_MARGIN * envelope, f"{stat}: {report}"
    agree = float((with_kernels.argmax(-1) == truth.argmax(-1)).float().mean())
    agree_ref = min(float((r.argmax(-1) == truth.argmax(-1)).float().mean()) for r in references)
    assert agree >= agree_ref - 2 / len(ids), f"argmax agreement with fp32: kernels {agree:.2f}, references >= {agree_ref:.2f}"


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
def test_fused_decoder_layer_matches_the_per_op_path(tiny_ckpt, kernels, kernel_calls, mode, monkeypatch):
    """KernelOps.decoder_layer (one C call per layer) against the same kernels op by op, on decode steps
    over a paged cache: the same products, norms, RoPE and attention in the same order, so the logits
    agree to the few ulps where silu's exp differs (libm's expf vs PyTorch's vectorised exp)."""
    from smolvlm.quant import quantize_decoder

    model = SmolVLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    if mode == "int8":
        quantize_decoder(model)
    ids = list(range(5, 29))
    kernel_calls.clear()
    ops = KernelOps(kernels)
    fused = stepwise_logits(model, CpuBackend(kernels), ops, ids)
    assert kernel_calls["decoder_layer"] == len(ids) * model.config.text.num_hidden_layers, dict(kernel_calls)
    # the loader (fp32/bf16) and quantize_decoder (int8, scales too) lay q/k/v and gate/up out back to back:
    # each is one product
    assert all(plan.n_qkv == 1 and plan.n_gate_up == 1 for _, plan, _, _ in ops._plans.values())
    with monkeypatch.context() as patch:
        patch.setattr(KernelOps, "decoder_layer", TorchOps.decoder_layer)
        kernel_calls.clear()
        per_op = stepwise_logits(model, CpuBackend(kernels), KernelOps(kernels), ids)
        assert kernel_calls["decoder_layer"] == 0
    scale = float(per_op.abs().max())
    tolerance = scale * (2.0**-6 if mode == "bf16" else 2.0**-18)  # a bf16 flip / fp32 ulps, amplified by depth
    difference = (fused - per_op).abs()
    assert float(difference.max()) <= tolerance, (
        f"max |fused - per-op| {float(difference.max()):.3g} at {divmod(int(difference.argmax()), per_op.shape[1])}, "
        f"tolerance {tolerance:.3g}")
    assert torch.equal(fused.argmax(-1), per_op.argmax(-1))


def test_fused_decoder_layer_steps_aside_for_hooks_and_other_backends(tiny_ckpt, kernels, kernel_calls):
    """A hook anywhere in a layer (or a non-C attention backend) sends that layer op by op, where the hook runs."""
    model = SmolVLM.from_pretrained(tiny_ckpt)
    ids = list(range(5, 13))
    seen = []
    layer = model.model.text_model.layers[1]
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    kernel_calls.clear()
    stepwise_logits(model, CpuBackend(kernels), KernelOps(kernels), ids)
    layers = model.config.text.num_hidden_layers
    assert len(seen) == len(ids) and kernel_calls["decoder_layer"] == len(ids) * (layers - 1), dict(kernel_calls)
    handle.remove()
    kernel_calls.clear()
    stepwise_logits(model, TorchBackend(), KernelOps(kernels), ids)
    assert kernel_calls["decoder_layer"] == 0, dict(kernel_calls)
    # a replaced weight is seen at the next step (the layer's plan is made again)
    kernel_calls.clear()
    before = stepwise_logits(model, CpuBackend(kernels), KernelOps(kernels), ids)
    with torch.no_grad():
        layer.mlp.down_proj.weight = torch.nn.Parameter(torch.zeros_like(layer.mlp.down_proj.weight))
    ops = KernelOps(kernels)
    after_fused = stepwise_logits(model, CpuBackend(kernels), ops, ids)
    assert not torch.equal(before, after_fused)
    reference = stepwise_logits(model, TorchBackend(), TorchOps(), ids)
    torch.testing.assert_close(after_fused, reference, rtol=1e-4, atol=1e-4)


def test_fused_decoder_layer_errors_name_the_tensor(kernels):
    d, hq, hkv, dh, f = 64, 4, 2, 16, 128
    w = lambda n, k: torch.randn(n, k)  # noqa: E731
    norms = (torch.ones(d), torch.ones(d))
    plan_args = ([[w((hq + 2 * hkv) * dh, d), None, (hq + 2 * hkv) * dh]], [[w(d, hq * dh), None, d]],
                 [[w(2 * f, d), None, 2 * f]], [[w(d, f), None, d]], (hq, hkv), dh, 1e-5, 0.25)
    plan = kernels.layer_plan(norms, *plan_args)
    with pytest.raises(ValueError, match="projection sizes"):
        kernels.layer_plan(norms, [[w(10, d), None, 10]], *plan_args[1:])
    with pytest.raises(TypeError, match="one dtype"):
        kernels.layer_plan(norms, [[w((hq + 2 * hkv) * dh, d).bfloat16(), None, (hq + 2 * hkv) * dh]], *plan_args[1:])
    cache = torch.zeros(4, 16, hkv, dh)
    good = dict(x=torch.randn(1, d), cos=torch.ones(1, dh), sin=torch.zeros(1, dh), k_cache=cache, v_cache=cache.clone(),
                slot_mapping=torch.tensor([0]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                seq_lens=torch.ones(1, dtype=torch.int32))
    kernels.decoder_layer(plan, **good)  # runs
    for name, bad, match in (("x", torch.randn(1, d + 1), "x must be"), ("cos", torch.ones(2, dh), "cos/sin"),
                             ("k_cache", torch.zeros(4, 16, hkv, dh + 2), "caches"),
                             ("seq_lens", torch.ones(1, dtype=torch.int64), "seq_lens"),
                             ("block_tables", torch.full((1, 1), 9, dtype=torch.int32), "out of range")):
        with pytest.raises((ValueError, RuntimeError), match=match):
            kernels.decoder_layer(plan, **dict(good, **{name: bad}))
