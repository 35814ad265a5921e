"""uint8 tiles -> float32 `pixel_values`, and padding a batch into `pixel_attention_mask`.

Normalisation must be bit-identical to transformers, whose images and video frames use different
float arithmetic:

- images (`SmolVLMImageProcessorPil`: image_transforms.rescale, then .normalize):
      x = float32(float64(v) * rescale_factor);  (x - float32(mean)) / float32(std)   in float32
- video frames (`TorchvisionBackend.rescale_and_normalize`, rescale folded into mean and std):
      (float32(v) - mean * (1 / rescale_factor)) / (std * (1 / rescale_factor))       in float32

The two differ in the last bit for half the byte values; both are reproduced. Inputs are bytes, so
each rule is fully described by a (3, 256) table (`Normalization.table`). Applying the table by
lookup is slow on 64 frames (a gather with 8-byte indices), so `apply` computes
((x / divisor) - mean') / std' in float32 instead, having checked once, on all 256 byte values,
that this reproduces the table exactly; if it ever does not, it falls back to the lookup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class Normalization:
    table: np.ndarray  # (3, 256) float32: the reference value of byte v in channel c
    divisor: float  # fast path: ((x / divisor) - mean) / std, float32 arithmetic
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fast_path_is_exact: bool = field(init=False)

    def __post_init__(self) -> None:
        fast = self._fast(torch.arange(256, dtype=torch.uint8).expand(3, 256)[None, :, :, None])[0, :, :, 0]
        object.__setattr__(self, "fast_path_is_exact", bool(np.array_equal(fast.numpy(), self.table)))

    def _fast(self, tiles: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = tiles.to(torch.float32)
        if self.divisor != 1.0:  # x / 1 is x: skip the pass (video frames fold the rescale into mean/std)
            x = x.div_(self.divisor)
        return x.sub_(mean).div_(std)

    def apply(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, H, W) float32, equal to the table."""
        if self.fast_path_is_exact:
            return self._fast(tiles)
        table = torch.from_numpy(self.table)
        return torch.stack([table[c][tiles[:, c].long()] for c in range(3)], dim=1)


@lru_cache(maxsize=16)
def image_normalization(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple
) -> Normalization:
    values = np.arange(256, dtype=np.uint8)
    x = (values.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else values.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if not do_normalize:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    table = (x - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    divisor = float(np.float32(1 / rescale_factor)) if do_rescale else 1.0
    return Normalization(np.ascontiguousarray(table, dtype=np.float32), divisor, tuple(mean), tuple(std))


@lru_cache(maxsize=16)
def video_normalization(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple
) -> Normalization:
    x = torch.arange(256, dtype=torch.float32).expand(3, 256)
    if do_normalize:
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        if do_rescale:
            mean_t, std_t = mean_t * (1.0 / rescale_factor), std_t * (1.0 / rescale_factor)
        table = x.sub(mean_t[:, None]).div(std_t[:, None])
        fast = (1.0, tuple(mean_t.tolist()), tuple(std_t.tolist()))
    else:
        table = x * rescale_factor if do_rescale else x.clone()
        fast = (float(np.float32(1 / rescale_factor)) if do_rescale else 1.0, (0.0,) * 3, (1.0,) * 3)
    return Normalization(table.contiguous().numpy(), *fast)


def tiles_sha256(tiles: torch.Tensor, normalization: Normalization) -> str:
    """Content hash of one image (or video) as the model sees it: tile bytes + shape + normalisation."""
    digest = hashlib.sha256()
    digest.update(str(tuple(tiles.shape)).encode())
    digest.update(normalization.table.tobytes())
    digest.update(memoryview(tiles.contiguous().numpy()).cast("B"))  # no copy
    return digest.hexdigest()


def pad_batch(
    per_conversation: list[torch.Tensor | None], padding_tile_mask: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each conversation's float tiles ((n_i, 3, h, w), or None) into
    pixel_values (B, N, 3, H, W) float32 and pixel_attention_mask (B, N, H, W) int64, where N is
    the most tiles any conversation has and H, W the largest tile. Padding pixels are 0.

    The mask of a padding *tile* is 0 for images (SmolVLMImageProcessorPil._preprocess) but 1 for
    video frames (SmolVLMVideoProcessor.pad builds the mask after padding the frame axis): the caller
    passes `padding_tile_mask=1` for a batch of videos to reproduce that. The model ignores padding
    tiles either way: it drops frames whose pixels are all zero."""
    present = [t for t in per_conversation if t is not None]
    max_tiles = max(t.shape[0] for t in present)
    height, width = max(t.shape[2] for t in present), max(t.shape[3] for t in present)
    if len(per_conversation) == 1:  # one conversation, nothing to pad: no copy
        tiles = per_conversation[0]
        if tiles.shape[2:] == (height, width):
            mask = torch.ones((1, tiles.shape[0], height, width), dtype=torch.int64)
            return tiles.unsqueeze(0), mask

    batch = len(per_conversation)
    pixel_values = torch.zeros(batch, max_tiles, 3, height, width, dtype=torch.float32)
    pixel_attention_mask = torch.full((batch, max_tiles, height, width), padding_tile_mask, dtype=torch.int64)
    for b, tiles in enumerate(per_conversation):
        if tiles is None:
            continue
        k, _, h, w = tiles.shape
        pixel_values[b, :k, :, :h, :w] = tiles
        pixel_attention_mask[b, :k] = 0
        pixel_attention_mask[b, :k, :h, :w] = 1
    return pixel_values, pixel_attention_mask
