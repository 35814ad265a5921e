"""Input checks shared by the kernel launchers.

A Triton kernel trusts its pointers: a wrong dtype, a transposed view or an int64 table where
int32 was expected reads garbage silently. Every launcher runs these checks first and raises a
ValueError / TypeError that names the offending argument.
"""

from __future__ import annotations

import os

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """All tensors on one device, and a device Triton can run on: CUDA, or the CPU interpreter."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    first_name, device = next(iter(devices.items()))
    for name, other in devices.items():
        if other != device:
            raise ValueError(f"{name} is on {other} but {first_name} is on {device}: all inputs must share a device")
    if device.type == "cpu" and not interpreter_enabled():
        raise ValueError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton "
            "(or use the torch reference backend on CPU)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got {device}")
    return device


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected one of: {names}")


def check_same_dtype(reference_name: str, reference: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    for name, tensor in others.items():
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but {reference_name} has {reference.dtype}: they must match")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...], meaning: str) -> None:
    """`expected` holds one entry per dimension; None accepts any size. `meaning` names the dims."""
    if tensor.dim() != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected [{shown}] ({meaning})")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Kernels read the head dimension as one contiguous vector; other dims may have any stride."""
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last (head_dim) dimension, got strides {tensor.stride()}")


def check_index(name: str, tensor: torch.Tensor, dims: int, allowed=(torch.int32,)) -> None:
    check_dtype(name, tensor, allowed)
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def check_head_dim(head_dim: int) -> None:
    """tl.arange needs a power of two; 16 is the smallest tile a tensor-core dot accepts."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} is not supported: it must be a power of two between 16 and 256")


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    """k_cache / v_cache: [num_blocks, block_size, Hkv, D], same shape and strides, contiguous head_dim."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, kv_heads, head_dim], got shape {tuple(cache.shape)}")
        check_last_dim_contiguous(name, cache)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)}/{k_cache.stride()} and v_cache {tuple(v_cache.shape)}/{v_cache.stride()} "
            "must have the same shape and strides"
        )
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} differs from q head_dim {head_dim}")


def check_gqa(num_query_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_query_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_query_heads}) must be a multiple of key/value heads ({num_kv_heads}) for GQA"
        )


def check_scale(scale: float) -> None:
    if not isinstance(scale, (float, int)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The DOT_PRECISION constexpr of attention_math.dot: fp32 inputs get exact fp32 dots ("ieee"),
    so the Triton backend matches the torch reference; fp16/bf16 use the tensor cores' native path;
    bf16 under the CPU interpreter is upcast (the interpreter's bf16 dot is broken)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and device.type == "cpu":
        return "upcast"
    return "tf32"
