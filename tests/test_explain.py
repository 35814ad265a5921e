"""Where the model looks (issue 12): the geometry of image tokens on the photo, the research
generation loop, logit lens, and `smolvlm explain` end to end.

Geometry is checked against the processor itself: a photo that is black but for one small white
square lands, after the real tiling, in exactly one token block of one tile; a one-hot attention
on that token must light exactly the square of the reassembled map that contains it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm import SmolVLM
from smolvlm.engine import Engine, SamplingParams
from smolvlm.processing import Processor
from smolvlm.processing.processor import MediaItem
from smolvlm.research import generate, logit_lens, media_heat, render_image, render_video
from smolvlm.research.explain import upsample


@pytest.fixture(scope="module")
def processor(processor_dir):
    return Processor.from_pretrained(processor_dir)  # 512 px tiles, 64 tokens (8 x 8) each


def brightest_token(pixel_values, side):
    """(tile, row, col) of the token block with the most white, over every tile."""
    n, _, h, w = pixel_values.shape
    blocks = pixel_values.mean(1).reshape(n, side, h // side, side, w // side).mean((2, 4))  # (N, side, side)
    flat = int(blocks.argmax())
    return np.unravel_index(flat, blocks.shape)


@pytest.mark.parametrize("size, split", [((1024, 768), True), ((600, 1800), True), ((2048, 512), True),
                                         ((700, 700), True), ((640, 480), False)])
def test_one_token_lights_exactly_its_square_of_the_photo(processor, size, split):
    width, height = size
    probe = processor.prepare([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", size)}]}],
                              do_image_splitting=split)
    m = probe.media[0]
    side = 8
    rows, cols = (m.rows, m.cols) if m.rows else (1, 1)
    # choose a token of a tile, away from the edges; put a white square at its centre, in photo pixels
    tile_r, tile_c, a, b = rows - 1, cols // 2, 5, 2
    cell_h, cell_w = height / (rows * side), width / (cols * side)  # one token's square on the photo
    cy, cx = (tile_r * side + a + 0.5) * cell_h, (tile_c * side + b + 0.5) * cell_w
    photo = np.zeros((height, width, 3), dtype=np.uint8)
    half = max(1, int(min(cell_h, cell_w) / 6))
    photo[int(cy) - half : int(cy) + half, int(cx) - half : int(cx) + half] = 255
    item = processor.prepare([{"role": "user", "content": [{"type": "image", "image": photo}]}], do_image_splitting=split)
    tiles = item.pixel_values  # (N, 3, 512, 512)
    chosen_tile = tile_r * cols + tile_c if m.rows else 0
    assert brightest_token(tiles[: rows * cols] if m.rows else tiles, side) == (chosen_tile, a, b)

    weights = np.zeros(item.pixel_values.shape[0] * 64)
    weights[chosen_tile * 64 + a * side + b] = 1.0
    [heat] = media_heat(weights, item.media, 64)
    lit_map = heat.grid if m.rows else heat.thumbnail
    assert np.argwhere(lit_map).tolist() == [[tile_r * side + a, tile_c * side + b]]
    lit = np.argwhere(upsample(lit_map, (width, height)))  # (pixels, 2) rows / cols on the photo
    top, left = lit.min(0)
    bottom, right = lit.max(0) + 1
    assert top <= cy < bottom and left <= cx < right, "the lit square does not hold the white square"
    assert abs((bottom - top) - cell_h) <= 1 and abs((right - left) - cell_w) <= 1
    assert len(lit) == (bottom - top) * (right - left)  # one solid rectangle

    if m.rows:  # the global thumbnail: the square's token of the 8 x 8 grid over the whole photo
        g = brightest_token(item.pixel_values[-1:], side)
        assert g == (0, int(cy / height * side), int(cx / width * side))


def test_video_frames_each_get_their_own_map_and_mass():
    media = [MediaItem("video", "", 4, timestamps=["00:00", "00:01", "00:02", "00:03"])]
    weights = np.zeros(4 * 64)
    weights[2 * 64 + 3 * 8 + 6] = 0.75  # frame 2, token row 3, column 6
    weights[0 * 64 + 0] = 0.25
    [heat] = media_heat(weights, media, 64)
    assert heat.kind == "video" and len(heat.frames) == 4 and heat.timestamps[2] == "00:02"
    assert np.argwhere(heat.frames[2]).tolist() == [[3, 6]] and heat.frame_mass == [0.25, 0.0, 0.75, 0.0]
    frames = [Image.new("RGB", (96, 64), "gray") for _ in range(4)]
    picture = render_video(heat, frames, "test")
    assert picture.width > 4 * 100 and picture.height > 160


def test_mixed_media_split_in_prompt_order(processor):
    media = [MediaItem("image", "", 5, 2, 2), MediaItem("video", "", 2, timestamps=["00:00", "00:01"]), MediaItem("image", "", 1)]
    weights = np.arange(8 * 64, dtype=float)
    heats = media_heat(weights, media, 64)
    assert [h.kind for h in heats] == ["image", "video", "image"]
    assert heats[0].grid.shape == (16, 16) and heats[0].grid[8, 8] == 3 * 64  # tile (1, 1), token (0, 0)
    assert heats[1].frames[1][0, 0] == 6 * 64 and heats[2].grid is None and heats[2].thumbnail[0, 0] == 7 * 64
    with pytest.raises(ValueError, match="weights for"):
        media_heat(weights[:-1], media, 64)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return SmolVLM.from_pretrained(tiny_ckpt), Processor.from_pretrained(tiny_ckpt)


def test_the_research_loop_answers_as_the_engine_does_and_honours_hooks(tiny, tiny_ckpt, photos):
    model, processor = tiny
    conversation = [{"role": "user", "content": [{"type": "image", "image": photos["coffee"]}, {"type": "text", "text": "What?"}]}]
    result = generate(model, processor, conversation, max_new_tokens=8)
    engine = Engine.from_pretrained(tiny_ckpt, attention_backend="torch", cpu_kernels="torch", num_kv_blocks=64)
    [reference] = engine.generate([conversation], SamplingParams(max_new_tokens=8))
    assert result.token_ids == [t for t in reference.token_ids if t not in engine.stop_token_ids]
    forced = 123
    calls = []

    def force(logits, name):
        calls.append(tuple(logits.shape))
        out = torch.full_like(logits, -1e9)
        out[..., forced] = 0
        return out

    with model.hooks({"lm_head": force}):
        steered = generate(model, processor, conversation, max_new_tokens=5)
    assert steered.token_ids == [forced] * 5 and calls == [(1, 1, model.config.text.vocab_size)] * 5


def test_logit_lens_ends_with_the_model_s_own_prediction(tiny):
    model, _ = tiny
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    table = logit_lens(model, ids, position=-1, k=3)
    assert [layer for layer, _ in table] == list(range(model.config.text.num_hidden_layers))
    own = torch.softmax(model(ids)[0, -1], -1).topk(3)
    assert [t for t, _ in table[-1][1]] == own.indices.tolist()
    assert np.allclose([p for _, p in table[-1][1]], own.values.tolist(), atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        logit_lens(model, ids, position=9)


def test_smolvlm_explain_writes_the_picture(tiny_ckpt, tmp_path, photos):
    photo = tmp_path / "coffee.png"
    photos["coffee"].save(photo)
    out = tmp_path / "heat.png"
    run = subprocess.run(
        [sys.executable, "-m", "smolvlm.cli", "explain", "--model", str(tiny_ckpt), "--image", str(photo), "-n", "4",
         "--logit-lens", "2", "--layer", "1", "What is this?", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert out.is_file() and Image.open(out).width > photos["coffee"].width / 2
    assert "logit lens at position" in run.stdout and "layer  1:" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "smolvlm.cli", "explain", "--model", str(tiny_ckpt), "--layer", "99",
                          "--image", str(photo), "-n", "2", "Hi", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --layer 99: this model has 2 layers (0..1)", bad.stderr


def test_smolvlm_explain_draws_video_frames(tiny_ckpt, tmp_path, short_video):
    out = tmp_path / "frames.png"
    run = subprocess.run(
        [sys.executable, "-m", "smolvlm.cli", "explain", "--model", str(tiny_ckpt), "--video", str(short_video),
         "-n", "3", "--head", "0", "What happens?", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    picture = Image.open(out)
    assert picture.width >= 3 * 160 and picture.height > 160  # 3 sampled frames in a row, the mass bars below
    assert "head 0" in run.stderr
