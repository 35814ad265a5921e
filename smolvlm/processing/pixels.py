"""uint8 tiles -> float32 `pixel_values`, and padding a batch into `pixel_attention_mask`.

Inputs are uint8, so normalisation is a 256-entry lookup table per channel, computed with exactly
the float arithmetic of the reference so that values are bit-identical:

- images (`SmolVLMImageProcessorPil`: image_transforms.rescale then .normalize):
  x = float32(float64(v) * rescale_factor);  (x - float32(mean)) / float32(std)   in float32
- video frames (`TorchvisionBackend.rescale_and_normalize`, fused):
  (float32(v) - float32(mean) * (1 / rescale_factor)) / (float32(std) * (1 / rescale_factor))
The two differ in the last bit for some values; both are reproduced.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=16)
def image_lut(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple
) -> np.ndarray:
    """(3, 256) float32: the value of byte v in channel c, Pillow image processor arithmetic."""
    values = np.arange(256, dtype=np.uint8)
    x = (values.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else values.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if do_normalize:
        x = (x - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


@lru_cache(maxsize=16)
def video_lut(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple
) -> np.ndarray:
    """(3, 256) float32: the value of byte v in channel c, torchvision video processor arithmetic."""
    x = torch.arange(256, dtype=torch.float32).expand(3, 256)
    if do_normalize:
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        if do_rescale:  # rescale folded into mean/std
            mean_t, std_t = mean_t * (1.0 / rescale_factor), std_t * (1.0 / rescale_factor)
        x = x.sub(mean_t[:, None]).div(std_t[:, None])
    elif do_rescale:
        x = x * rescale_factor
    return x.contiguous().numpy()


def normalize_tiles(tiles: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, 3, H, W) float32 through a (3, 256) lookup table."""
    out = np.empty(tiles.shape, dtype=np.float32)
    for c in range(3):
        np.take(lut[c], tiles[:, c], out=out[:, c])
    return out


def tiles_sha256(tiles: np.ndarray, lut: np.ndarray) -> str:
    """Content hash of one image (or video) as the model sees it: tile bytes + shape + normalisation."""
    digest = hashlib.sha256()
    digest.update(str(tiles.shape).encode())
    digest.update(lut.tobytes())
    digest.update(np.ascontiguousarray(tiles).tobytes())
    return digest.hexdigest()


def pad_batch(
    per_conversation: list[list[np.ndarray]], padding_tile_mask: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each conversation's float tiles (list of (n_i, 3, h, w)) into
    pixel_values (B, N, 3, H, W) float32 and pixel_attention_mask (B, N, H, W) int64, where N is
    the most tiles any conversation has and H, W the largest tile. Padding pixels are 0.

    The mask of a padding *tile* is 0 for images (SmolVLMImageProcessorPil._preprocess) but 1 for
    video frames (SmolVLMVideoProcessor.pad builds the mask after padding the frame axis): the caller
    passes `padding_tile_mask=1` for a batch of videos to reproduce that. The model ignores padding
    tiles either way: it drops frames whose pixels are all zero."""
    shapes = [t.shape for tiles in per_conversation for t in tiles]
    max_tiles = max(sum(t.shape[0] for t in tiles) for tiles in per_conversation)
    height, width = max(s[2] for s in shapes), max(s[3] for s in shapes)
    batch = len(per_conversation)
    pixel_values = torch.zeros(batch, max_tiles, 3, height, width, dtype=torch.float32)
    pixel_attention_mask = torch.full((batch, max_tiles, height, width), padding_tile_mask, dtype=torch.int64)
    for b, tiles in enumerate(per_conversation):
        n = 0
        for block in tiles:  # (k, 3, h, w)
            k, _, h, w = block.shape
            pixel_values[b, n : n + k, :, :h, :w] = torch.from_numpy(block)
            pixel_attention_mask[b, n : n + k] = 0
            pixel_attention_mask[b, n : n + k, :h, :w] = 1
            n += k
    return pixel_values, pixel_attention_mask
