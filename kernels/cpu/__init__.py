"""CPU kernels for decode steps (`cpu_kernels.c`), compiled at first use. Package `smolvlm_cpu_kernels`.

    kernels = CpuKernels.load()                       # builds cpu_kernels.c once per machine, or raises
    y = kernels.matvec(x, weight)                     # F.linear(x, weight) for a few rows of x
    y = kernels.rms_norm(x, weight, eps)              # LlamaRMSNorm
    y = kernels.rotary(x, cos, sin)                   # rotary position embedding (rotate-half)
    kernels.store_kv(k, v, k_cache, v_cache, slots)   # new K/V into paged-cache slots
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)

Why: in a decode step (one token per sequence) the model streams every weight from memory once and
runs ~1,000 tiny ops. PyTorch's bf16 F.linear reads the weights well below memory speed in a decode
loop; `matvec` streams them near it (`tools/bench_matvec.py`, numbers in docs/benchmarks.md); the
others replace 6-12 PyTorch ops each (a few microseconds of fixed cost per op). The references they
are tested against are the PyTorch code they replace (tests/test_cpu_kernels.py). The model takes
them through `smolvlm.ops.KernelOps`, as an argument of each call.

Numerics: inputs convert to fp32 exactly, sums accumulate in fp32, each output is rounded once to its
dtype: the same functions as PyTorch's, up to the order of the sums. The elementwise ones keep the
reference's per-op roundings (RMSNorm two, RoPE three: RoPE is bit-identical to its reference).

The shared library is built with the system C compiler (`$CC`, else `cc`) and `-march=native`, and
kept under `$XDG_CACHE_HOME/smolvlm` (default `~/.cache/smolvlm`), keyed by the source, the flags,
the compiler and this CPU's feature flags (a cache shared between machines never hands one another's
instructions). No compiler, or a failed build: `load()` raises `CpuKernelsUnavailable` saying why.

Two builds of the same source: the native one uses AVX-512 where the CPU has it; `load(generic=True)`
(or `SMOLVLM_CPU_KERNELS_GENERIC=1` in the environment, for every load) compiles only the portable C
paths, which are what a CPU without AVX-512 runs; the tests check both on any machine.
`kernels.avx512` says which one was loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")  # kernels/cpu/cpu_kernels.c
# -ffp-contract=off: a * b + c stays two roundings (as in PyTorch's separate ops), never one fused
# multiply-add, so the elementwise kernels reproduce their references bit for bit.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # as the enum in cpu_kernels.c
I64, INT, FLOAT, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
class _Piece(ctypes.Structure):  # smolvlm_piece in cpu_kernels.c
    _fields_ = [("w", PTR), ("scales", PTR), ("n", I64)]


class _Layer(ctypes.Structure):  # smolvlm_layer in cpu_kernels.c (same order, same types)
    _fields_ = [
        ("M", I64), ("D", I64), ("Hq", I64), ("Hkv", I64), ("Dh", I64), ("F", I64),
        ("dtype", INT), ("wtype", INT), ("eps", FLOAT), ("scale", FLOAT),
        ("x", PTR), ("ln1", PTR), ("ln2", PTR),
        ("qkv", _Piece * 3), ("o", _Piece), ("gate_up", _Piece * 2), ("down", _Piece),
        ("n_qkv", INT), ("n_gate_up", INT),
        ("cos", PTR), ("sin", PTR), ("k_cache", PTR), ("v_cache", PTR),
        ("num_blocks", I64), ("block_size", I64), ("max_blocks", I64),
        ("slot_mapping", PTR), ("block_tables", PTR), ("seq_lens", PTR), ("num_threads", INT),
    ]


SIGNATURES = {  # C function -> argument types (all return int: 0 = success)
    "smolvlm_matvec": [PTR, INT, PTR, INT, PTR, INT, I64, I64, I64, INT],
    "smolvlm_matvec_q8": [PTR, PTR, PTR, INT, PTR, INT, I64, I64, I64, INT],
    "smolvlm_rms_norm": [PTR, PTR, PTR, INT, I64, I64, FLOAT],
    "smolvlm_store_kv": [PTR, PTR, PTR, PTR, PTR, I64, I64, I64],
    "smolvlm_rotary": [PTR, PTR, PTR, PTR, INT, I64, I64, I64, I64],
    "smolvlm_paged_decode_attention": [PTR, PTR, PTR, PTR, PTR, PTR, INT, I64, I64, I64, I64, I64, I64, I64, FLOAT, INT],
    "smolvlm_simd_avx512": [],
    "smolvlm_q8_avx2": [],
    "smolvlm_simd_avx2": [],
    "smolvlm_decoder_layer": [ctypes.POINTER(_Layer)],
}


GENERIC_ENV = "SMOLVLM_CPU_KERNELS_GENERIC"  # "1": every load() builds the portable paths only


class CpuKernelsUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here (no C compiler, or the build failed)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "smolvlm"


def build(compiler: str | None = None, generic: bool = False) -> Path:
    """Compile cpu_kernels.c (or reuse the cached build); the path of the shared library.
    `generic`: leave out the AVX-512 paths (-DSMOLVLM_GENERIC)."""
    compiler = compiler or os.environ.get("CC") or "cc"
    flags = FLAGS + ["-DSMOLVLM_GENERIC"] if generic else FLAGS
    path = shutil.which(compiler)
    if path is None:
        raise CpuKernelsUnavailable(
            f"no C compiler found (tried {compiler!r}; set $CC): the CPU decode kernels are compiled at "
            "first use. Install gcc, or pass cpu_kernels='torch' to run decode steps in plain PyTorch."
        )
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(flags), path, *version, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            result = subprocess.run([path, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                raise CpuKernelsUnavailable(
                    f"compiling {SOURCE.name} with {path} failed (exit {result.returncode}):\n{result.stderr.strip()}"
                )
            os.replace(out, target)  # atomic: a concurrent build of the same key writes the same bytes
    except OSError as e:
        raise CpuKernelsUnavailable(
            f"cannot build the CPU kernels in {target.parent} ({e}); set $XDG_CACHE_HOME to a writable directory"
        ) from None
    return target


def _check_cpu(names: str, *tensors: torch.Tensor) -> None:
    """Each tensor on the CPU and contiguous; `names` names them, comma-separated, for the error."""
    for name, t in zip(names.split(", "), tensors):
        if not t.is_cpu:
            raise ValueError(f"CpuKernels run on CPU tensors; {name} is on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"CpuKernels need contiguous tensors; {name} (shape {tuple(t.shape)}) is not")


def _dtype_code(names: str, *tensors: torch.Tensor) -> int:
    """The dtype code shared by all `tensors` (float32 or bfloat16), else TypeError naming them."""
    dtype = tensors[0].dtype
    code = DTYPE_CODES.get(dtype)
    if code is None or any(t.dtype != dtype for t in tensors):
        found = ", ".join(f"{name} {t.dtype}" for name, t in zip(names.split(", "), tensors))
        raise TypeError(f"expected one dtype, float32 or bfloat16, for all of: {found}")
    return code


class CpuKernels:
    """The compiled kernels, with input checks. Build with `load()`."""

    # Rows up to which `matvec` beats PyTorch's matmul (tools/bench_matvec.py; docs/benchmarks.md):
    # beyond, the arithmetic (the kernel does no cache blocking) outweighs the weight traffic it saves.
    max_rows = 8
    # int8 weights: up to here the C kernel (each weight row read once, up to this many rows against it
    # from L1) beats dequantizing the whole weight for a GEMM, e.g. a decode step of 32 sequences.
    max_rows_int8 = 32

    def __init__(self, library: ctypes.CDLL):
        for name, argtypes in SIGNATURES.items():
            fn = getattr(library, name)
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
        self._lib = library
        self.avx512 = bool(library.smolvlm_simd_avx512())  # False: the portable C paths
        self.q8_avx2 = bool(library.smolvlm_q8_avx2())  # the int8 matvec's AVX2 path (else portable C)
        self.avx2 = bool(library.smolvlm_simd_avx2())  # fp32/bf16 matvec's AVX2 path (no AVX-512 here)

    def __repr__(self) -> str:
        return f"CpuKernels({'avx512' if self.avx512 else 'generic'})"

    @classmethod
    def load(cls, compiler: str | None = None, generic: bool | None = None) -> "CpuKernels":
        """Build (or reuse) and load the library. `generic`: portable paths only; default from
        $SMOLVLM_CPU_KERNELS_GENERIC."""
        if generic is None:
            generic = os.environ.get(GENERIC_ENV, "") not in ("", "0")
        path = build(compiler, generic)
        try:
            return cls(ctypes.CDLL(str(path)))
        except (OSError, AttributeError) as e:
            raise CpuKernelsUnavailable(f"cannot load {path}: {e}") from None

    @staticmethod
    def _status(name: str, status: int) -> None:
        if status != 0:
            reason = {1: "bad dtype code", 2: "out of memory", 3: "a slot, sequence length or block-table entry is out of range"}
            raise RuntimeError(f"{name} failed: {reason.get(status, f'status {status}')}")

    # ------------------------------------------------------------------ matvec

    def accepts(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `matvec(x, weight)` applies (linear.DecodeKernels): CPU, fp32/bf16, a contiguous
        weight, at most `max_rows` rows."""
        return (
            x.is_cpu
            and weight.is_cpu
            and x.dtype in DTYPE_CODES
            and weight.dtype in DTYPE_CODES
            and weight.is_contiguous()
            and x.numel() <= self.max_rows * x.shape[-1]
        )

    def matvec(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (..., K) fp32/bf16, weight (N, K) fp32/bf16 -> (..., N) in x's dtype: F.linear(x, weight)."""
        # Checks kept to attribute reads: this runs ~120 times per decoded token.
        if x.dtype not in DTYPE_CODES or weight.dtype not in DTYPE_CODES:
            raise TypeError(f"matvec takes float32/bfloat16 tensors, got x {x.dtype} and weight {weight.dtype}")
        if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"shapes do not match: x {tuple(x.shape)} @ weight {tuple(weight.shape)}^T")
        if not (x.is_cpu and weight.is_cpu and weight.is_contiguous()):
            raise ValueError(f"matvec needs CPU tensors and a contiguous weight, got x on {x.device}, weight on "
                             f"{weight.device} with strides {weight.stride()}")
        x = x.contiguous()  # (..., K): the rows of x, back to back
        n, k = weight.shape
        if k == 0 or x.numel() == 0:
            return torch.zeros(*x.shape[:-1], n, dtype=x.dtype)
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (..., N)
        status = self._lib.smolvlm_matvec(
            weight.data_ptr(), DTYPE_CODES[weight.dtype],
            x.data_ptr(), DTYPE_CODES[x.dtype],
            out.data_ptr(), DTYPE_CODES[out.dtype],
            x.numel() // k, n, k, torch.get_num_threads(),
        )
        if status:
            self._status("smolvlm_matvec", status)
        return out

    # ------------------------------------------------------------------ int8 weights

    def accepts_int8(self, x: torch.Tensor, qweight: torch.Tensor) -> bool:
        """Whether `matvec_int8` applies: CPU, x fp32/bf16, at most `max_rows_int8` rows, K a multiple of 32."""
        return x.is_cpu and qweight.is_cpu and x.dtype in DTYPE_CODES and qweight.shape[1] % 32 == 0 \
            and x.numel() <= self.max_rows_int8 * x.shape[-1]

    def matvec_int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (..., K) fp32/bf16, qweight (N, K) int8, scales (N, K / 32) fp32 -> (..., N) in x's dtype:
        F.linear(x, qweight * scales per group of 32) (smolvlm.quant.dequantize_int8)."""
        n, k = qweight.shape
        if qweight.dtype != torch.int8 or scales.dtype != torch.float32 or x.dtype not in DTYPE_CODES:
            raise TypeError(f"matvec_int8 takes int8 weights, fp32 scales and fp32/bf16 x, got {qweight.dtype}, "
                            f"{scales.dtype}, {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != k or k % 32 or tuple(scales.shape) != (n, k // 32):
            raise ValueError(f"shapes do not match: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                             f"scales {tuple(scales.shape)} (K a multiple of 32, one scale per 32)")
        if not (x.is_cpu and qweight.is_cpu and scales.is_cpu and qweight.is_contiguous() and scales.is_contiguous()):
            raise ValueError("matvec_int8 needs CPU tensors and contiguous weights and scales")
        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (..., N)
        status = self._lib.smolvlm_matvec_q8(
            qweight.data_ptr(), scales.data_ptr(), x.data_ptr(), DTYPE_CODES[x.dtype], out.data_ptr(),
            DTYPE_CODES[out.dtype], x.numel() // k if k else 0, n, k, torch.get_num_threads(),
        )
        if status:
            self._status("smolvlm_matvec_q8", status)
        return out

    # ------------------------------------------------------------------ RMSNorm

    def accepts_rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `rms_norm` applies: CPU, one dtype (fp32/bf16), at most `max_rows` rows."""
        return (
            x.is_cpu
            and x.dtype == weight.dtype
            and x.dtype in DTYPE_CODES
            and x.numel() <= self.max_rows * x.shape[-1]
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., K), weight (K,) -> weight * (x / sqrt(mean(x^2) + eps)), as smolvlm.text.RMSNorm."""
        # Checks kept to attribute reads (~60 calls per decoded token); _check_cpu / _dtype_code cost more.
        if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
            raise ValueError(f"rms_norm: x {tuple(x.shape)} does not end in weight's size {tuple(weight.shape)}")
        code = DTYPE_CODES.get(x.dtype)
        if code is None or weight.dtype != x.dtype:
            raise TypeError(f"rms_norm takes one dtype, float32 or bfloat16: x {x.dtype}, weight {weight.dtype}")
        if not (x.is_cpu and weight.is_cpu and weight.is_contiguous()):
            raise ValueError(f"rms_norm needs CPU tensors and a contiguous weight (x on {x.device}, weight on {weight.device})")
        x = x.contiguous()
        out = torch.empty_like(x)
        k = x.shape[-1]
        status = self._lib.smolvlm_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), code, x.numel() // max(k, 1), k, eps)
        if status:
            self._status("smolvlm_rms_norm", status)
        return out

    # ------------------------------------------------------------------ a whole decoder layer

    def layer_plan(
        self,
        norms: tuple[torch.Tensor, torch.Tensor],
        qkv: list,
        o: list,
        gate_up: list,
        down: list,
        heads: tuple[int, int],
        head_dim: int,
        eps: float,
        scale: float,
    ) -> _Layer:
        """The checked, step-independent half of `decoder_layer`'s arguments, for one layer's weights
        (kept by the caller while those weights stay the same). Projections are lists of (weight, scales,
        rows) pieces side by side: (W (n, K) fp32/bf16, None, rows) or (q int8 (n, K), scales fp32
        (n, K / 32), rows). rows > n: the rows after W's own (and, for int8, its scales') continue in the tensors that follow in
        memory (the caller has checked they do: text.DecoderLayer.plain_parts). norms: (input_layernorm,
        post_attention_layernorm) weights; heads: (Hq, Hkv)."""
        hq, hkv = heads
        d = norms[0].shape[0]
        dtype = norms[0].dtype
        for name, t in (("input_layernorm", norms[0]), ("post_attention_layernorm", norms[1])):
            if t.dtype not in DTYPE_CODES or t.dtype != dtype or t.shape != (d,) or not (t.is_cpu and t.is_contiguous()):
                raise ValueError(f"decoder_layer: {name} weight must be a contiguous CPU float32/bfloat16 ({d},) tensor")
        weights = [w for w, scales, _ in (*qkv, *o, *gate_up, *down) if scales is None]
        wtype = weights[0].dtype if weights else dtype
        f = sum(rows for _, _, rows in gate_up) // 2
        if len(o) != 1 or len(down) != 1:
            raise ValueError("decoder_layer: o and down projections are one piece each")

        def piece(w: torch.Tensor, scales: torch.Tensor | None, rows: int, k: int) -> _Piece:
            if not (w.is_cpu and w.is_contiguous() and w.dim() == 2 and w.shape[1] == k):
                raise ValueError(f"decoder_layer: weight {tuple(w.shape)} should be a contiguous CPU (n, {k}) matrix")
            if scales is None:
                if w.dtype != wtype or w.dtype not in DTYPE_CODES:
                    raise TypeError(f"decoder_layer: weights must share one dtype, float32 or bfloat16, got {w.dtype} and {wtype}")
                return _Piece(w.data_ptr(), None, rows)
            if w.dtype != torch.int8 or scales.dtype != torch.float32 or not (scales.is_cpu and scales.is_contiguous()) \
                    or tuple(scales.shape) != (w.shape[0], k // 32) or k % 32:
                raise ValueError(f"decoder_layer: int8 weight {tuple(w.shape)} {w.dtype} needs fp32 scales "
                                 f"({w.shape[0]}, {k // 32}), got {scales.dtype} {tuple(scales.shape)}")
            return _Piece(w.data_ptr(), scales.data_ptr(), rows)

        if not 1 <= len(qkv) <= 3 or not 1 <= len(gate_up) <= 2:
            raise ValueError(f"decoder_layer: q/k/v in 1-3 pieces and gate/up in 1-2, got {len(qkv)} and {len(gate_up)}")
        if sum(rows for _, _, rows in qkv) != (hq + 2 * hkv) * head_dim or o[0][2] != d or down[0][2] != d \
                or sum(rows for _, _, rows in gate_up) != 2 * f or head_dim % 2:
            raise ValueError("decoder_layer: projection sizes do not match the heads, head size and hidden size")
        plan = _Layer()
        plan.D, plan.Hq, plan.Hkv, plan.Dh, plan.F = d, hq, hkv, head_dim, f
        plan.dtype, plan.wtype, plan.eps, plan.scale = DTYPE_CODES[dtype], DTYPE_CODES.get(wtype, DTYPE_CODES[dtype]), eps, scale
        plan.ln1, plan.ln2 = norms[0].data_ptr(), norms[1].data_ptr()
        for i, (w, sc, rows) in enumerate(qkv):
            plan.qkv[i] = piece(w, sc, rows, d)
        for i, (w, sc, rows) in enumerate(gate_up):
            plan.gate_up[i] = piece(w, sc, rows, d)
        plan.o, plan.down = piece(*o[0], hq * head_dim), piece(*down[0], f)
        plan.n_qkv, plan.n_gate_up = len(qkv), len(gate_up)
        return plan

    def decoder_layer(
        self,
        plan: _Layer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        """One decoder layer of a decode step, x (M, D) updated in place (smolvlm_decoder_layer in
        cpu_kernels.c: the per-op kernels in one call); `plan` from `layer_plan` (the layer's weights).
        cos/sin (M, Dh); caches [num_blocks, block_size, Hkv, Dh]; slot_mapping (M,) int64;
        block_tables (M, W) and seq_lens (M,) int32. Each mismatch raises, naming the tensor."""
        m = x.shape[0]
        dtype = x.dtype
        if DTYPE_CODES.get(dtype) != plan.dtype or x.dim() != 2 or x.shape[1] != plan.D or not x.is_contiguous() or not x.is_cpu:
            raise ValueError(f"decoder_layer: x must be a contiguous CPU (M, {plan.D}) tensor of the norms' dtype, "
                             f"got {dtype} {tuple(x.shape)}")
        dh = plan.Dh
        if cos.shape != (m, dh) or sin.shape != (m, dh) or cos.dtype != dtype or sin.dtype != dtype \
                or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError(f"decoder_layer: cos/sin must be contiguous ({m}, {dh}) {dtype}, got {tuple(cos.shape)} {cos.dtype}")
        if k_cache.dim() != 4 or k_cache.shape[2:] != (plan.Hkv, dh) or v_cache.shape != k_cache.shape \
                or k_cache.dtype != dtype or v_cache.dtype != dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError(f"decoder_layer: caches must be contiguous [blocks, block_size, {plan.Hkv}, {dh}] {dtype}, "
                             f"got {tuple(k_cache.shape)} {k_cache.dtype}")
        if slot_mapping.shape != (m,) or seq_lens.shape != (m,) or block_tables.dim() != 2 or block_tables.shape[0] != m \
                or slot_mapping.dtype != torch.int64 or block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            raise ValueError(f"decoder_layer: slot_mapping ({m},) int64, block_tables ({m}, W) and seq_lens ({m},) int32, "
                             f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}, {tuple(block_tables.shape)} "
                             f"{block_tables.dtype}, {tuple(seq_lens.shape)} {seq_lens.dtype}")
        slot_mapping, block_tables, seq_lens = slot_mapping.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
        plan.M, plan.x, plan.cos, plan.sin = m, x.data_ptr(), cos.data_ptr(), sin.data_ptr()
        plan.k_cache, plan.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        plan.num_blocks, plan.block_size, plan.max_blocks = k_cache.shape[0], k_cache.shape[1], block_tables.shape[1]
        plan.slot_mapping, plan.block_tables, plan.seq_lens = slot_mapping.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr()
        plan.num_threads = torch.get_num_threads()
        status = self._lib.smolvlm_decoder_layer(ctypes.byref(plan))
        if status:
            self._status("smolvlm_decoder_layer", status)

    # ------------------------------------------------------------------ rotary embedding

    def accepts_rotary(self, x: torch.Tensor, cos: torch.Tensor) -> bool:
        """Whether `rotary` applies: CPU, x (N, H, D) with contiguous heads, at most `max_rows` tokens."""
        return (
            x.is_cpu
            and x.dim() == 3
            and x.dtype == cos.dtype
            and x.dtype in DTYPE_CODES
            and x.shape[0] <= self.max_rows
            and x.stride(2) == 1
            and x.stride(1) == x.shape[2]
        )

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (N, H, D) (heads contiguous, any token stride), cos/sin (N, D) -> (N, H, D), as text.apply_rotary."""
        n, h, d = x.shape
        if x.stride(2) != 1 or x.stride(1) != d or d % 2:
            raise ValueError(f"rotary needs x (N, H, D) with contiguous heads and even D, got shape {tuple(x.shape)} strides {x.stride()}")
        cos, sin = cos.contiguous(), sin.contiguous()
        if cos.shape != (n, d) or sin.shape != (n, d):
            raise ValueError(f"rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} should be ({n}, {d})")
        code = DTYPE_CODES.get(x.dtype)
        if code is None or cos.dtype != x.dtype or sin.dtype != x.dtype:
            raise TypeError(f"rotary takes one dtype, float32 or bfloat16: x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}")
        if not (x.is_cpu and cos.is_cpu and sin.is_cpu):
            raise ValueError(f"CpuKernels run on CPU tensors; x is on {x.device}, cos on {cos.device}")
        out = torch.empty(n, h, d, dtype=x.dtype)
        status = self._lib.smolvlm_rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), code, n, h, d, x.stride(0))
        if status:
            self._status("smolvlm_rotary", status)
        return out

    # ------------------------------------------------------------------ paged KV cache

    def store_kv(
        self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """key/value (N, Hkv, D) -> their slots of k_cache/v_cache [num_blocks, block_size, Hkv, D];
        slot_mapping (N,) int64, -1 = skip."""
        key, value = key.contiguous(), value.contiguous()
        _check_cpu("key, value, k_cache, v_cache, slot_mapping", key, value, k_cache, v_cache, slot_mapping)
        _dtype_code("key, value, k_cache, v_cache", key, value, k_cache, v_cache)
        if key.dim() != 3 or key.shape != value.shape or key.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
            raise ValueError(
                f"store_kv: key {tuple(key.shape)} / value {tuple(value.shape)} rows do not fit the caches "
                f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
            )
        if slot_mapping.dtype != torch.int64 or slot_mapping.shape != key.shape[:1]:
            raise ValueError(f"slot_mapping must be int64 of shape ({key.shape[0]},), got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
        row_bytes = key.shape[1] * key.shape[2] * key.element_size()  # one token's K (or V), all heads
        status = self._lib.smolvlm_store_kv(
            key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
            key.shape[0], row_bytes, k_cache.shape[0] * k_cache.shape[1],
        )
        if status:
            self._status("smolvlm_store_kv", status)

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q (B, Hq, D), one token per sequence; caches [num_blocks, block_size, Hkv, D];
        block_tables (B, max_blocks) int32; seq_lens (B,) int32 -> (B, Hq, D)."""
        q = q.contiguous()
        block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
        _check_cpu("q, k_cache, v_cache, block_tables, seq_lens", q, k_cache, v_cache, block_tables, seq_lens)
        code = _dtype_code("q, k_cache, v_cache", q, k_cache, v_cache)
        b, hq, d = q.shape
        num_blocks, block_size, hkv, d_cache = k_cache.shape
        if d != d_cache or hq % hkv or v_cache.shape != k_cache.shape:
            raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            raise TypeError(f"block_tables and seq_lens must be int32, got {block_tables.dtype} and {seq_lens.dtype}")
        if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
            raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} do not match {b} sequences")
        out = torch.empty_like(q)
        status = self._lib.smolvlm_paged_decode_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), seq_lens.data_ptr(), code,
            b, hq, hkv, d, block_size, block_tables.shape[1], num_blocks, scale, torch.get_num_threads(),
        )
        if status:
            self._status("smolvlm_paged_decode_attention", status)
        return out
