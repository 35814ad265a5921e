"""The engine's settings (one frozen dataclass; `Engine.from_pretrained(..., **fields)` takes them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size; else from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; default 1 GiB on CPU, half the free memory on CUDA
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    vision_cache_memory: int = 256 << 20  # bytes of image features kept for reuse
    # The vision tower runs over at most this many tiles (frames) at a time, so its activations (~70 MB per
    # 512² tile in fp32 on CPU, attention scores included) stay bounded whatever the image or video.
    # None: 1 on CPU (as fast as larger passes there, and the peak memory of one tile: docs/benchmarks.md),
    # all of an image's tiles at once on CUDA (where batching them is what makes the tower fast).
    vision_tiles_per_pass: int | None = None
    attention_backend: str = "auto"
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA + triton backend only)
    # Decode steps on CPU: "c" = smolvlm_cpu_kernels.CpuKernels (C, compiled at first use: weight products,
    # RMSNorm, RoPE, KV store, decode attention), "torch" = plain PyTorch, "auto" = "c" when it builds,
    # else "torch" with a warning. Ignored on CUDA. The engine passes its choice to every model call it
    # makes (`ops`, smolvlm/ops.py); the model itself is never changed.
    cpu_kernels: str = "auto"

    def __post_init__(self) -> None:  # checked before any memory is allocated, each message naming the field
        for name, low in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("vision_cache_memory", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EngineConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("num_kv_blocks", "kv_cache_memory", "max_model_len", "vision_tiles_per_pass"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be None or an int >= 1, got {value!r}")
        for name in ("enable_prefix_caching", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
