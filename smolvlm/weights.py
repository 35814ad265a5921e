"""Checkpoint location and strict safetensors loading.

Strict means: every tensor in the file is used, every parameter of the model is filled, every shape
matches; otherwise `CheckpointError` lists the offending names. Weights are read with safetensors
only (memory-mapped, never pickle). The checkpoint's tensor names are the module paths of our model
(`model.text_model.layers.0.self_attn.q_proj.weight` is `SmolVLM.model.text_model.layers[0]...`),
so there is no renaming table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(ValueError):
    """The checkpoint cannot be found or does not match the model."""


# The files a model directory may need; used to restrict hub downloads.
CHECKPOINT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_checkpoint(path_or_repo_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is, else a Hugging Face hub repo id downloaded into the hub cache.

    Local-first: an existing directory always wins. A repo id is fetched with huggingface-hub
    (cached, with its progress bar); offline, the cache is used if it has the files.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise CheckpointError(f"{text} is a file; expected a checkpoint directory or a hub repo id")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {text} does not exist (and it is not a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns or CHECKPOINT_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {text!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}: {e}). If you are offline, pass the path of a local checkpoint "
            f"directory instead (one holding config.json and model.safetensors)."
        ) from None


def safetensors_files(directory: Path) -> list[Path]:
    """`model.safetensors`, or the shards named by `model.safetensors.index.json`."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {directory}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"weight shard {f} listed in the index is missing")
    return files


def huge_page_arena(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU storage for every parameter of `model`: one buffer, cut into views in module order.

    Why one buffer: (1) it can ask Linux for transparent huge pages (2 MB instead of 4 KB; this
    policy is often `madvise`, so memory gets them only when asked), and a decode step, which
    streams every weight once, reads them faster (fewer TLB misses, and the hardware prefetcher stops
    at page boundaries; docs/benchmarks.md); (2) module order puts q/k/v and gate/up side by side, so
    the fused decode products (text.py, `fused_weight`) run over views of it, not copies.
    The buffer is virtual memory until written: slots that `load_weights` leaves unused (tensors
    used as mapped from the file) cost nothing. It lives as long as its views.
    """
    return huge_page_buffers({name: (p.shape, dtype) for name, p in model.named_parameters()})


def huge_page_buffers(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """One huge-page-backed CPU buffer cut into uninitialised tensors, name -> (shape, dtype), back to
    back in the order given: consecutive tensors of one dtype are adjacent in memory; a tensor after
    one of a smaller element size starts at the next multiple of its own element size."""
    offsets: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    total = 0
    for name, (shape, dtype) in specs.items():
        element = torch.empty((), dtype=dtype).element_size()
        total = -(-total // element) * element  # aligned for this dtype
        offsets[name] = (total, tuple(shape), dtype)
        total += math.prod(shape) * element
    buffer = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere plain pages
        buffer.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(buffer, dtype=torch.uint8)  # keeps `buffer` alive
    out = {}
    for name, (start, shape, dtype) in offsets.items():
        element = torch.empty((), dtype=dtype).element_size()
        out[name] = flat[start : start + math.prod(shape) * element].view(dtype).view(shape)
    return out


def load_weights(
    model: nn.Module,
    directory: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    into: dict[str, torch.Tensor] | None = None,
    always_into: frozenset[str] = frozenset(),
) -> None:
    """Fill every parameter of `model` (which may live on the meta device) from the safetensors files.

    Tensors are converted to `dtype` and moved to `device` one at a time, then assigned in place of
    the module's parameters (`load_state_dict(assign=True)`), so no random init and no second copy.
    `into`: preallocated destinations by name (`huge_page_arena`). A tensor is converted straight into
    its destination when it needs a dtype conversion (a copy is made anyway) or when its name is in
    `always_into` (weights every decode step streams, for which huge pages pay for the copy); any other
    tensor is used as memory-mapped from the file, and its destination is never touched.
    Floating-point tensors only are cast; buffers that are not in the checkpoint (RoPE frequencies)
    stay as the model built them.
    """
    expected = {name: p for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        for name, got in shapes.items():
            if name not in expected:
                unexpected.append(name)
                continue
            if name in state:
                raise CheckpointError(f"tensor {name} appears in more than one shard")
            want = tuple(expected[name].shape)
            if got != want:
                misshaped.append(f"{name}: checkpoint {list(got)} vs model {list(want)}")
                continue
            # One memory map per tensor: the pages read stay resident only while it is open, so
            # peak memory is the model plus one tensor, not the model plus the whole file.
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
            if not tensor.is_floating_point():
                raise CheckpointError(f"tensor {name} has non-float dtype {tensor.dtype}")
            if into is not None and name in into and (tensor.dtype != dtype or name in always_into):
                state[name] = into[name].copy_(tensor)  # converts on the way
            else:
                state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state) - {m.split(":")[0] for m in misshaped})
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): {'; '.join(misshaped[:20])}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match the model config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Loading converts tensor by tensor (a float32 copy read from the file, then the model's dtype);
    glibc keeps the freed copies' pages for reuse, ~140 MB of resident memory for the 256M model in
    bf16 that nothing will reuse. Called once after loading.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:  # musl and other libcs have no malloc_trim
        trim(0)
