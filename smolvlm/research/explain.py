"""Where the model looks: attention from answer tokens to image tokens, drawn over the photo (or
over each sampled frame of a video).

Geometry (REFERENCE.md section 5, connector.py): an image becomes R x C tiles of `tile` px (plus a
global thumbnail of the whole image, last), or one tile when unsplit. Each tile is 32 x 32 patches
of 16 px; pixel shuffle (r = 4) makes them an 8 x 8 grid of tokens, row-major, each covering a
64 x 64 px square of its tile. So the 64 tokens of tile (i, j) fill cells [8i, 8i+8) x [8j, 8j+8)
of an (8R, 8C) grid over the resized image, which is the photo scaled (tiles are cut from the photo
resized to R*tile x C*tile): the grid maps onto the original photo by scaling alone. The global
tile's 8 x 8 grid covers the whole photo too. A video frame is one unsplit tile.

    heat = attention_to_media(model, generation, layer=None, head=None, token=None)  # one per medium
    picture = render(heat[0], photo)                           # PIL image: photo + heat | thumbnail + heat
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from smolvlm.research.hooks import hooks


@dataclass
class MediaHeat:
    """Attention mass on one image or video, laid out as the pixels it covers."""

    kind: str  # "image" or "video"
    grid: np.ndarray | None  # image split into tiles: (side*R, side*C) over the photo; None when unsplit
    thumbnail: np.ndarray | None  # image: (side, side) over the whole photo (the global tile)
    frames: list[np.ndarray] = field(default_factory=list)  # video: (side, side) per sampled frame
    timestamps: list[str] = field(default_factory=list)

    @property
    def frame_mass(self) -> list[float]:
        return [float(f.sum()) for f in self.frames]


def media_heat(weights: np.ndarray, media, image_seq_len: int) -> list[MediaHeat]:
    """Attention on each medium's image tokens, in place.

    weights (n_image_tokens,): one value per `<image>` token of the prompt, in prompt order (all
    media's tokens, back to back); media: the processor's MediaItems (kind, num_tiles, rows, cols,
    timestamps). Returns one MediaHeat per medium."""
    side = int(round(image_seq_len**0.5))
    if side * side != image_seq_len:
        raise ValueError(f"image_seq_len {image_seq_len} is not a square number of tokens")
    expected = sum(m.num_tiles for m in media) * image_seq_len
    if len(weights) != expected:
        raise ValueError(f"{len(weights)} weights for {expected} image tokens")
    out, offset = [], 0
    for m in media:
        tiles = weights[offset : offset + m.num_tiles * image_seq_len].reshape(m.num_tiles, side, side)  # row-major tokens
        offset += m.num_tiles * image_seq_len
        if m.kind == "video":
            out.append(MediaHeat("video", None, None, frames=list(tiles), timestamps=list(m.timestamps)))
            continue
        grid = None
        if m.rows:  # tiles row-major, then the global one
            grid = tiles[: m.rows * m.cols].reshape(m.rows, m.cols, side, side).transpose(0, 2, 1, 3)  # (R, side, C, side)
            grid = grid.reshape(m.rows * side, m.cols * side)
        out.append(MediaHeat("image", grid, tiles[-1]))
    return out


def attention_rows(model, generation, layer: int | None = None, head: int | None = None, token: int | None = None) -> np.ndarray:
    """Attention from the answer to every prompt position, (T_prompt,): the rows of the positions
    that predicted each answer token (or only answer token `token`), mean over heads (or `head`) and
    layers (or `layer`). One forward pass over prompt + answer, probabilities captured by hooks."""
    text = model.config.text
    n_prompt, n_answer = len(generation.input_ids), len(generation.token_ids)
    if n_answer == 0:
        raise ValueError("the answer is empty: nothing attends to the image")
    if token is not None and not 0 <= token < n_answer:
        raise ValueError(f"--token {token}: the answer has {n_answer} tokens (0..{n_answer - 1})")
    if layer is not None and not 0 <= layer < text.num_hidden_layers:
        raise ValueError(f"--layer {layer}: the decoder has {text.num_hidden_layers} layers (0..{text.num_hidden_layers - 1})")
    if head is not None and not 0 <= head < text.num_attention_heads:
        raise ValueError(f"--head {head}: the layers have {text.num_attention_heads} heads (0..{text.num_attention_heads - 1})")
    # query rows: position p predicts token p + 1, so answer token j came from row n_prompt - 1 + j
    rows = torch.arange(n_prompt - 1, n_prompt - 1 + n_answer)
    if token is not None:
        rows = rows[token : token + 1]
    layers = range(text.num_hidden_layers) if layer is None else [layer]
    kept: list[torch.Tensor] = []

    def keep(probabilities: torch.Tensor, name: str) -> None:  # (1, H, T, T) -> (len(rows), T_prompt)
        p = probabilities[0, :, rows, :n_prompt]
        kept.append((p.mean(0) if head is None else p[head]).float())

    sequence = generation.sequence.to(model.device)
    pixels = None if generation.pixel_values is None else generation.pixel_values.to(model.device)
    with torch.no_grad(), hooks(model, {f"model.text_model.layers.{i}.self_attn.weights": keep for i in layers}):
        model(sequence, pixels)
    return torch.stack(kept).mean(dim=(0, 1)).cpu().numpy()  # (T_prompt,)


def attention_to_media(model, generation, layer=None, head=None, token=None) -> list[MediaHeat]:
    rows = attention_rows(model, generation, layer, head, token)
    image_token = model.config.image_token_id
    image_positions = [i for i, t in enumerate(generation.input_ids) if t == image_token]
    return media_heat(rows[image_positions], generation.media, model.config.image_seq_len)


# ---------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ---------------------------------------------------------------------------------------------

# black -> red -> yellow -> white, 256 steps ("hot")
_HOT = np.clip(np.stack([np.linspace(0, 3, 256), np.linspace(-1, 2, 256), np.linspace(-2, 1, 256)], 1), 0, 1)


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) cells -> (height, width) pixels, each cell a solid block (size = (width, height), PIL's)."""
    width, height = size
    rows = np.minimum((np.arange(height) * heat.shape[0]) // height, heat.shape[0] - 1)
    cols = np.minimum((np.arange(width) * heat.shape[1]) // width, heat.shape[1] - 1)
    return heat[rows][:, cols]


def overlay(picture: Image.Image, heat: np.ndarray, scale: tuple[float, float]) -> Image.Image:
    """The picture darkened, with heat in the 'hot' colours on top; scale = (low, high) of the colour range."""
    picture = picture.convert("RGB")
    low, high = scale
    level = np.clip((upsample(heat, picture.size) - low) / max(high - low, 1e-12), 0, 1)  # (H, W)
    colours = _HOT[(level * 255).astype(np.int64)] * 255  # (H, W, 3)
    base = np.asarray(picture, dtype=np.float64) * 0.45
    alpha = (0.25 + 0.75 * level)[..., None]
    return Image.fromarray(np.clip(base * (1 - alpha) + colours * alpha + base * alpha * 0.3, 0, 255).astype(np.uint8))


def _fit(picture: Image.Image, longest: int) -> Image.Image:
    scale = longest / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))


def render_image(heat: MediaHeat, photo: Image.Image, title: str = "", longest: int = 768) -> Image.Image:
    """[photo + tile heat (when split)] [thumbnail + global-tile heat], one shared colour scale."""
    photo = _fit(photo.convert("RGB"), longest)
    parts = [a for a in (heat.grid, heat.thumbnail) if a is not None]
    scale = min(float(a.min()) for a in parts), max(float(a.max()) for a in parts)  # one colour range for both
    panels = []
    if heat.grid is not None:
        panels.append(("tiles", overlay(photo, heat.grid, scale)))
    thumb = photo if heat.grid is None else _fit(photo, longest // 3)
    panels.append(("global thumbnail", overlay(thumb, heat.thumbnail, scale)))
    width = sum(p.width for _, p in panels) + 10 * (len(panels) + 1)
    height = max(p.height for _, p in panels) + 40
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 4), title, fill="black")
    x = 10
    for label, panel in panels:
        canvas.paste(panel, (x, 30))
        draw.text((x, 18), label, fill="black")
        x += panel.width + 10
    return canvas


def render_video(heat: MediaHeat, frames: list[Image.Image], title: str = "", cell: int = 160, columns: int = 8) -> Image.Image:
    """A grid of the sampled frames, each with its heat and timestamp, and a bar of attention mass per frame."""
    if len(frames) != len(heat.frames):
        raise ValueError(f"{len(frames)} frames for {len(heat.frames)} heat maps")
    scale = min(float(f.min()) for f in heat.frames), max(float(f.max()) for f in heat.frames)
    columns = min(columns, len(frames))
    rows = (len(frames) + columns - 1) // columns
    bar_height = 80
    canvas = Image.new("RGB", (columns * (cell + 6) + 6, 24 + rows * (cell + 20) + bar_height + 20), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), title, fill="black")
    for i, (frame, frame_heat) in enumerate(zip(frames, heat.frames)):
        x, y = 6 + (i % columns) * (cell + 6), 24 + (i // columns) * (cell + 20)
        canvas.paste(overlay(frame.convert("RGB").resize((cell, cell)), frame_heat, scale), (x, y + 14))
        draw.text((x, y), heat.timestamps[i] if i < len(heat.timestamps) else f"frame {i}", fill="black")
    mass = np.array(heat.frame_mass)
    top = 24 + rows * (cell + 20) + 10
    width = (canvas.width - 12) / len(mass)
    for i, m in enumerate(mass):
        h = (bar_height - 14) * m / max(float(mass.max()), 1e-12)
        draw.rectangle([6 + i * width, top + bar_height - h, 6 + (i + 1) * width - 2, top + bar_height], fill=(200, 60, 30))
    draw.text((6, top - 4), "attention mass per frame", fill="black")
    return canvas
