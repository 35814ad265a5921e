"""Processor parity against transformers 5.24 (pinned in pyproject): input_ids, attention_mask and
pixel_attention_mask identical, pixel_values within 1e-5 of `SmolVLMImageProcessorPil` (we get 0.0),
on real photographs (several sizes and modes), a text document, multi-image and multi-turn
conversations, batches, per-call overrides, and videos (short, and 70 s so the end-skip rule runs).

transformers decodes videos with torchcodec by default, which is not installed here, so the reference
decodes with `transformers.video_utils.load_video(backend="decord")` and its own `sample_frames`, then
runs the processor on those frames: every step after decoding is transformers' own.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm.processing import Processor, ProcessorError
from smolvlm.processing.prompt import number_to_words
from smolvlm.processing.video import load_video, sample_frame_indices

from transformers.models.smolvlm import SmolVLMImageProcessorPil, SmolVLMProcessor  # the pinned reference
from transformers.video_utils import load_video as tf_load_video

# ---------------------------------------------------------------------------------------------
# Fixtures: processor directories, photos, videos
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_processor_dir(processor_dir, make_checkpoints, tmp_path_factory) -> Path:
    """The real tokenizer with the tiny model's processor shape (64 px tiles, 16 tokens, 256 px resize)."""
    out = tmp_path_factory.mktemp("tiny_processor")
    for f in processor_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    shape = make_checkpoints.TINY_PROCESSOR
    make_checkpoints.write_json(out / "preprocessor_config.json", make_checkpoints.preprocessor_config(shape))
    make_checkpoints.write_json(
        out / "processor_config.json", {"image_seq_len": shape.image_seq_len, "processor_class": "SmolVLMProcessor"}
    )
    return out


_REFS: dict[Path, SmolVLMProcessor] = {}


def reference(directory: Path) -> SmolVLMProcessor:
    """transformers' processor with the Pillow image processor (the torchvision one differs by a few grey levels)."""
    if directory not in _REFS:
        image_processor = SmolVLMImageProcessorPil.from_pretrained(directory)
        _REFS[directory] = SmolVLMProcessor.from_pretrained(directory, image_processor=image_processor)
    return _REFS[directory]


@pytest.fixture(scope="session")
def proc(processor_dir) -> Processor:
    return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def tiny_proc(tiny_processor_dir) -> Processor:
    return Processor.from_pretrained(tiny_processor_dir)


def _photos() -> dict[str, Image.Image]:
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    rgba = astronaut.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "astronaut_512_rgb": astronaut,
        "chelsea_451x300_rgb": Image.fromarray(data.chelsea()),
        "coffee_600x400_cmyk": Image.fromarray(data.coffee()).convert("CMYK"),
        "camera_512_gray": Image.fromarray(data.camera()),  # mode L
        "page_384x191_document": Image.fromarray(data.page()),  # a scanned text page, mode L
        "rocket_427x640_palette": Image.fromarray(data.rocket()).quantize(64),  # mode P
        "astronaut_rgba": rgba,
        "tall_90x700": Image.fromarray(data.rocket()).crop((200, 0, 290, 427)).resize((90, 700)),
        "tiny_100x80": Image.fromarray(data.coffee()).resize((100, 80)),
    }


@pytest.fixture(scope="session")
def photo_paths(tmp_path_factory) -> dict[str, Path]:
    """`_photos()` saved as files (CMYK as JPEG), plus a JPEG whose EXIF says "rotate 90°"."""
    out = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, image in _photos().items():
        path = out / (f"{name}.jpg" if image.mode == "CMYK" else f"{name}.png")
        image.save(path)
        paths[name] = path
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    paths["exif_rotated_jpeg"] = out / "exif_rotated.jpg"
    _photos()["chelsea_451x300_rgb"].save(paths["exif_rotated_jpeg"], exif=exif, quality=90)
    return paths


def write_video(path: Path, seconds: float, fps: int, size=(160, 120)) -> Path:
    """An MPEG-4 clip cut from scikit-image photos, moving so that frames differ."""
    import av
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    n = int(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            base = np.asarray(Image.fromarray(sources[(i * 4) // n]).resize(size))
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("videos")
    return {
        "short": write_video(out / "short.mp4", seconds=3.5, fps=10),
        "long": write_video(out / "long.mp4", seconds=70, fps=2),  # > 66 s: 1 s skipped at both ends
    }


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def assert_same_batch(ours: dict, theirs, pixel_atol: float = 1e-5) -> None:
    theirs = {k: v for k, v in theirs.items()}
    assert sorted(ours) == sorted(theirs), f"keys differ: ours {sorted(ours)}, transformers {sorted(theirs)}"
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert a.shape == b.shape, f"{key}: shape {tuple(a.shape)} vs transformers {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{key}: dtype {a.dtype} vs transformers {b.dtype}"
        if key == "pixel_values":
            diff = (a - b).abs()
            worst = diff.max().item()
            where = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
            assert worst <= pixel_atol, f"pixel_values: max abs diff {worst} at {where}: {a[where]} vs {b[where]}"
        else:
            mismatch = (a != b).nonzero()
            assert len(mismatch) == 0, (
                f"{key}: {len(mismatch)} values differ, first at {tuple(mismatch[0].tolist())}: "
                f"{a[tuple(mismatch[0])].item()} vs transformers {b[tuple(mismatch[0])].item()}"
            )


def tf_apply(directory: Path, messages, **processor_kwargs):
    return reference(directory).apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs or None,
    )


def tf_video(directory: Path, messages, video_path: Path, num_frames=None, fps=None):
    """transformers on a one-video conversation, frames decoded by its decord backend."""
    ref = reference(directory)
    vp = ref.video_processor
    num_frames = vp.num_frames if num_frames is None else num_frames
    fps = vp.fps if fps is None else fps
    sample = partial(vp.sample_frames, num_frames=num_frames, fps=fps)
    frames, metadata = tf_load_video(str(video_path), backend="decord", sample_indices_fn=lambda metadata, **kw: sample(metadata))
    text = ref.apply_chat_template(messages, add_generation_prompt=True)
    out = ref(text=text, videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    return out, metadata


def image_message(path, text="Can you describe this image?"):
    return [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": text}]}]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

PHOTO_NAMES = [
    "astronaut_512_rgb",
    "chelsea_451x300_rgb",
    "coffee_600x400_cmyk",
    "camera_512_gray",
    "page_384x191_document",
    "rocket_427x640_palette",
    "astronaut_rgba",
    "tall_90x700",
    "tiny_100x80",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_image_parity_real_shape(name, photo_paths, proc, processor_dir):
    messages = image_message(photo_paths[name])
    ours = proc(messages)
    assert_same_batch(ours, tf_apply(processor_dir, messages))
    assert ours["pixel_values"].shape[2:] == (3, 512, 512)


def test_known_token_counts(photo_paths, proc):
    """REFERENCE.md section 5: a 512² image becomes 4x4 + 1 = 17 tiles and 1,127 prompt tokens...
    plus the template around it; a 100² one too (it is resized to 2048 first)."""
    item = proc.prepare(image_message(photo_paths["astronaut_512_rgb"]))
    assert (item.media[0].rows, item.media[0].cols, item.media[0].num_tiles) == (4, 4, 17)
    assert item.input_ids.count(proc.image_token_id) == 17 * 64
    unsplit = proc.prepare(image_message(photo_paths["astronaut_512_rgb"]), do_image_splitting=False)
    assert unsplit.input_ids.count(proc.image_token_id) == 64 and unsplit.media[0].num_tiles == 1


@pytest.mark.parametrize("name", ["chelsea_451x300_rgb", "camera_512_gray", "astronaut_rgba", "tall_90x700", "exif_rotated_jpeg"])
def test_image_parity_tiny_shape(name, photo_paths, tiny_proc, tiny_processor_dir):
    messages = image_message(photo_paths[name])
    ours = tiny_proc(messages)
    assert_same_batch(ours, tf_apply(tiny_processor_dir, messages))
    assert ours["pixel_values"].shape[2:] == (3, 64, 64)


@pytest.mark.parametrize("kind", ["pil_rgba", "pil_palette", "numpy_rgb", "numpy_rgba"])
def test_in_memory_images_match_transformers(kind, photos, tiny_proc, tiny_processor_dir):
    """PIL images and numpy arrays go through transformers' convert_to_rgb (alpha onto white), not load_image.
    `photos` is conftest's fixture: name -> PIL image."""
    image = {
        "pil_rgba": photos["logo"],
        "pil_palette": photos["rocket"].quantize(64),
        "numpy_rgb": np.asarray(photos["chelsea"]),
        "numpy_rgba": np.asarray(photos["logo"]),
    }[kind]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    assert_same_batch(tiny_proc(messages), tf_apply(tiny_processor_dir, messages))


def test_bytes_url_and_path_give_the_same_image(photo_paths, tiny_proc):
    import http.server
    import threading

    path = photo_paths["chelsea_451x300_rgb"]
    by_path = tiny_proc.prepare(image_message(path))
    by_bytes = tiny_proc.prepare([{"role": "user", "content": [{"type": "image", "image": path.read_bytes()}, {"type": "text", "text": "Can you describe this image?"}]}])

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        by_url = tiny_proc.prepare([{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "Can you describe this image?"}]}])
        with pytest.raises(ProcessorError, match="larger than"):
            from smolvlm.processing.image import fetch_url

            fetch_url(url, max_bytes=1000)
    finally:
        server.shutdown()
    for other in (by_bytes, by_url):
        assert other.input_ids == by_path.input_ids
        assert torch.equal(other.pixel_values, by_path.pixel_values)
        assert other.image_hashes == by_path.image_hashes


def test_image_hashes_follow_content(photo_paths, tiny_proc):
    a = tiny_proc.prepare(image_message(photo_paths["chelsea_451x300_rgb"]))
    b = tiny_proc.prepare(image_message(photo_paths["tiny_100x80"]))
    both = tiny_proc.prepare(
        [{"role": "user", "content": [{"type": "image", "path": str(photo_paths["chelsea_451x300_rgb"])}, {"type": "image", "path": str(photo_paths["tiny_100x80"])}]}]
    )
    assert len(a.image_hashes[0]) == 64 and a.image_hashes[0] != b.image_hashes[0]
    assert both.image_hashes == [a.image_hashes[0], b.image_hashes[0]]
    # same pixels after a different request: same hash; a changed setting: a different one
    assert tiny_proc.prepare(image_message(photo_paths["chelsea_451x300_rgb"], "other text")).image_hashes == a.image_hashes
    assert tiny_proc.prepare(image_message(photo_paths["chelsea_451x300_rgb"]), do_image_splitting=False).image_hashes != a.image_hashes


@pytest.mark.slow
def test_multi_image_multi_turn_system_parity(photo_paths, proc, processor_dir):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "path": str(photo_paths["chelsea_451x300_rgb"])},
                {"type": "text", "text": "with"},
                {"type": "image", "path": str(photo_paths["page_384x191_document"])},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first is a cat; the second is text."}]},
        {"role": "user", "content": [{"type": "image", "path": str(photo_paths["tiny_100x80"])}, {"type": "text", "text": "And this?"}]},
    ]
    item = proc.prepare(messages)
    ours = proc.collate([item])
    assert_same_batch(ours, tf_apply(processor_dir, messages))
    # cat 451x300 -> 2048x1362 -> 3x4 tiles + 1; page 384x191 -> 2x4 + 1; 100x80 -> 4x4 + 1
    assert [m.num_tiles for m in item.media] == [13, 9, 17]
    assert ours["pixel_values"].shape[1] == 13 + 9 + 17


def test_text_only_and_string_content(proc, processor_dir):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 12345 + 678? Naïve café 🙂\n\nTwo newlines."}]},
    ]
    ours = proc(messages)
    assert_same_batch(ours, tf_apply(processor_dir, messages))
    assert "pixel_values" not in ours
    as_strings = [{"role": m["role"], "content": m["content"][0]["text"]} for m in messages]
    assert torch.equal(proc(as_strings)["input_ids"], ours["input_ids"])


def test_batch_left_padding_parity(photo_paths, tiny_proc, tiny_processor_dir):
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": "Hello there, a text-only question."}]}],
        image_message(photo_paths["chelsea_451x300_rgb"]),
        [{"role": "user", "content": [{"type": "image", "path": str(photo_paths["tall_90x700"])}, {"type": "image", "path": str(photo_paths["tiny_100x80"])}, {"type": "text", "text": "Two?"}]}],
    ]
    ours = tiny_proc(conversations)
    theirs = tf_apply(tiny_processor_dir, conversations, padding=True, padding_side="left")
    assert_same_batch(ours, theirs)
    assert ours["attention_mask"][0, 0] == 0 and ours["attention_mask"][:, -1].all()  # left padded
    assert ours["pixel_attention_mask"][0].sum() == 0  # the text-only row has only padding tiles
    right = tiny_proc(conversations, padding_side="right")
    assert_same_batch(right, tf_apply(tiny_processor_dir, conversations, padding=True, padding_side="right"))


@pytest.mark.slow
@pytest.mark.parametrize("override", ["no_splitting", "longest_edge_1024"])
def test_per_call_overrides_parity(override, photo_paths, proc, processor_dir):
    messages = image_message(photo_paths["chelsea_451x300_rgb"])
    if override == "no_splitting":
        ours, theirs = proc(messages, do_image_splitting=False), tf_apply(processor_dir, messages, do_image_splitting=False)
        assert ours["pixel_values"].shape[1] == 1
    else:
        ours = proc(messages, image_longest_edge=1024)
        theirs = tf_apply(processor_dir, messages, size={"longest_edge": 1024})
        assert ours["pixel_values"].shape[1] == 2 * 2 + 1  # 451x300 -> 1024x682 -> 1024x1024: 2x2 tiles + 1
    assert_same_batch(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


def video_message(path, text="What happens in this video?"):
    return [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": text}]}]


def test_video_parity_short_tiny(videos, tiny_proc, tiny_processor_dir):
    messages = video_message(videos["short"])
    ours = tiny_proc(messages)
    theirs, metadata = tf_video(tiny_processor_dir, messages, videos["short"])
    assert_same_batch(ours, theirs)
    item = tiny_proc.prepare(messages)
    assert item.media[0].timestamps == ["00:00", "00:01", "00:02", "00:03"]  # 35 frames at 10 fps, 4 sampled
    assert list(metadata.frames_indices) == [0, 11, 22, 34]
    assert "series of four frames from a 0:00:03 [H:MM:SS] video.\n\nFrame from 00:00:" in item.prompt


def test_video_fps_and_max_frames_overrides(videos, tiny_proc, tiny_processor_dir):
    messages = video_message(videos["short"])
    ours = tiny_proc(messages, video_fps=2, video_max_frames=5)
    theirs, metadata = tf_video(tiny_processor_dir, messages, videos["short"], num_frames=5, fps=2)
    assert_same_batch(ours, theirs)
    assert ours["pixel_values"].shape[1] == 5 and len(metadata.frames_indices) == 5


@pytest.mark.slow
def test_video_parity_long_real_shape(videos, proc, processor_dir):
    """70 s at 2 fps, 64 frames of 512²: the end-skip rule runs (first index 2 = 1 s in, last < 139)."""
    messages = video_message(videos["long"])
    item = proc.prepare(messages)
    ours = proc.collate([item])
    theirs, metadata = tf_video(processor_dir, messages, videos["long"])
    assert_same_batch(ours, theirs)
    assert metadata.frames_indices[0] == 2 and metadata.frames_indices[-1] == 138
    assert ours["pixel_values"].shape[1] == 64
    assert "sixty-four frames from a 0:01:10 [H:MM:SS] video" in item.prompt


@pytest.mark.parametrize("which", ["short_video", "long_video"])
def test_h264_video_parity_tiny(which, request, tiny_proc, tiny_processor_dir):
    """conftest's H.264 clips (3 s at 10 fps; 70 s at 2 fps, end-skipped, 64 frames)."""
    path = request.getfixturevalue(which)
    messages = video_message(path)
    theirs, metadata = tf_video(tiny_processor_dir, messages, path)
    ours = tiny_proc(messages)
    assert_same_batch(ours, theirs)
    assert tiny_proc.prepare(messages).media[0].num_tiles == len(metadata.frames_indices) == (3 if which == "short_video" else 64)


def test_tiny_checkpoint_directory(tiny_ckpt, photos, tmp_path):
    """The tiny model's own directory (with config.json: the context length comes from it)."""
    proc = Processor.from_pretrained(tiny_ckpt)
    assert proc.config.context_length is not None and proc.config.image_seq_len == 16
    path = tmp_path / "coffee.png"
    photos["coffee"].save(path)
    assert_same_batch(proc(image_message(path)), tf_apply(tiny_ckpt, image_message(path)))


def test_sample_frame_indices_rule():
    # short: no skipping; round(fps * duration) frames, unique
    assert sample_frame_indices(35, 10.0, fps=1, max_frames=64) == [0, 11, 22, 34]
    # long (70 s > 2 + 64): start at 1 s, end 1 s before the end
    indices = sample_frame_indices(140, 2.0, fps=1, max_frames=64)
    assert len(indices) == 64 and indices[0] == 2 and indices[-1] == 138
    # a one-frame video, and a very short one, still give one frame
    assert sample_frame_indices(1, 25.0, fps=1, max_frames=64) == [0]
    assert sample_frame_indices(5, 25.0, fps=1, max_frames=64) == [0]


def test_pyav_fallback_matches_decord(videos, short_video, long_video, tiny_processor_dir):
    """Where decord has no wheel, PyAV decodes: same frame indices, same metadata, near-identical pixels."""
    settings = Processor.from_pretrained(tiny_processor_dir).config.video
    for name, path in (("mpeg4 short", videos["short"]), ("mpeg4 long", videos["long"]), ("h264 short", short_video), ("h264 long", long_video)):
        a = load_video(path, settings, backend="decord")
        b = load_video(path, settings, backend="pyav")
        assert a.frame_indices == b.frame_indices and a.total_frames == b.total_frames and a.source_fps == b.source_fps
        diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
        # measured on these MPEG-4 clips: mean 0.0 / 6e-5, max 0 / 2 grey levels (colour conversion rounding)
        assert diff.mean() < 0.05 and diff.max() <= 8, f"{name}: decord vs PyAV frames differ, mean {diff.mean()}, max {diff.max()}"


def test_images_and_video_in_one_conversation_keep_prompt_order(photo_paths, videos, tiny_proc):
    """transformers overwrites image pixel_values with the video's here; we keep both, in prompt order."""
    image = {"type": "image", "path": str(photo_paths["chelsea_451x300_rgb"])}
    video = {"type": "video", "path": str(videos["short"])}
    mixed = tiny_proc.prepare([{"role": "user", "content": [video, {"type": "text", "text": "and"}, image]}])
    video_only = tiny_proc.prepare([{"role": "user", "content": [video]}])
    image_only = tiny_proc.prepare([{"role": "user", "content": [image]}])
    assert [m.kind for m in mixed.media] == ["video", "image"]
    assert torch.equal(mixed.pixel_values, torch.cat([video_only.pixel_values, image_only.pixel_values]))
    assert mixed.input_ids.count(tiny_proc.image_token_id) == (4 + image_only.media[0].num_tiles) * 16


# ---------------------------------------------------------------------------------------------
# Tokenizer, decode, template files, numbers
# ---------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "digits 1234567890 and 3.14159",
    "unicode: naïve café, 日本語, emoji 🙂🚀",
    "new\nlines\n\n\nand\ttabs",
    "<image> inside text <fake_token_around_image><row_1_col_2><end_of_utterance>",
    "<|im_start|>User: hi<end_of_utterance>\nAssistant:",
]


def test_tokenizer_and_decode_parity(proc, processor_dir):
    tokenizer = reference(processor_dir).tokenizer
    for text in TEXTS:
        ids = proc.tokenizer.encode(text)
        assert ids == tokenizer(text)["input_ids"], f"ids differ for {text!r}"
        for skip in (False, True):
            assert proc.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip), text
    assert proc.decode(torch.tensor([[1, 2, 49190, 28, 29]]), skip_special_tokens=True) == tokenizer.decode(
        [1, 2, 49190, 28, 29], skip_special_tokens=True
    )


def test_rendered_prompts_match_transformers(proc, processor_dir):
    ref = reference(processor_dir)
    for messages in (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}],
        [{"role": "user", "content": [{"type": "video", "path": "x.mp4"}, {"type": "text", "text": "Describe"}]}],
    ):
        assert proc.render(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)
    assert proc.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}]) == (
        "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:"
    )


def test_chat_template_file_precedence(processor_dir, tmp_path):
    """chat_template.json wins over a stray chat_template.jinja (a saved SmolLM2 tokenizer leaves one), as in transformers."""
    for f in processor_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}JINJA{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}]
    assert Processor.from_pretrained(tmp_path).render(messages).startswith("<|im_start|>User: Hi")
    (tmp_path / "chat_template.json").unlink()
    assert Processor.from_pretrained(tmp_path).render(messages) == "JINJA"


def test_context_length_from_config_json(processor_dir, tmp_path):
    for f in processor_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 8192}}))
    assert Processor.from_pretrained(tmp_path).config.context_length == 8192
    assert Processor.from_pretrained(tmp_path, context_length=100).config.context_length == 100


def test_number_to_words_matches_num2words():
    from num2words import num2words  # a dev dependency only (transformers imports it unconditionally)

    numbers = list(range(0, 2001)) + [10_000, 10_001, 100_100, 1_000_000, 1_234_567, 2_000_000_017]
    wrong = [(n, number_to_words(n), num2words(n)) for n in numbers if number_to_words(n) != num2words(n)]
    assert not wrong, f"{len(wrong)} differ, first: {wrong[:3]}"
