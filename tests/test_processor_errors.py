"""Bad inputs raise `ProcessorError` (one type users can catch, a ValueError) whose message names the input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smolvlm.processing import Processor, ProcessorError


@pytest.fixture(scope="module")
def proc(processor_dir) -> Processor:
    return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def good_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def image_message(source, key="path", text="Describe."):
    return [{"role": "user", "content": [{"type": "image", key: source}, {"type": "text", "text": text}]}]


def copy_dir(source: Path, target: Path) -> Path:
    for f in source.iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    return target


def test_error_type_is_a_value_error():
    assert issubclass(ProcessorError, ValueError)


def test_missing_image_file(proc, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ProcessorError, match="image file not found: .*nope.png"):
        proc(image_message(str(missing)))


def test_corrupt_image(proc, tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ProcessorError, match="corrupt.png is not a readable image"):
        proc(image_message(str(path)))


def test_truncated_image(proc, tmp_path, good_png):
    path = tmp_path / "truncated.jpg"
    buffer = tmp_path / "full.jpg"
    Image.open(good_png).save(buffer, quality=95)
    path.write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    with pytest.raises(ProcessorError, match="truncated.jpg is corrupt or truncated"):
        proc(image_message(str(path)))


def test_corrupt_image_bytes(proc):
    with pytest.raises(ProcessorError, match="image bytes"):
        proc(image_message(b"\x89PNG\r\n\x1a\nbroken", key="image"))


def test_unsupported_numpy_image(proc):
    with pytest.raises(ProcessorError, match="uint8"):
        proc(image_message(np.zeros((8, 8, 3), dtype=np.float32), key="image"))


def test_image_item_without_source(proc):
    with pytest.raises(ProcessorError, match="none of the keys image/url/path/base64"):
        proc([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])


def test_unreachable_url(proc):
    with pytest.raises(ProcessorError, match="cannot fetch http://127.0.0.1:9/x.png"):
        proc(image_message("http://127.0.0.1:9/x.png", key="url"))


def test_unreadable_video(proc, tmp_path):
    path = tmp_path / "notavideo.mp4"
    path.write_text("plain text, no video here")
    with pytest.raises(ProcessorError, match="notavideo.mp4"):
        proc([{"role": "user", "content": [{"type": "video", "path": str(path)}]}])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_zero_frame_video(processor_dir, tmp_path, backend):
    import av

    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:  # a valid container whose video stream has no frames
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    proc = Processor.from_pretrained(processor_dir, video_backend=backend)
    with pytest.raises(ProcessorError, match="empty.mp4"):
        proc([{"role": "user", "content": [{"type": "video", "path": str(path)}]}])


def test_missing_video_file(proc, tmp_path):
    with pytest.raises(ProcessorError, match="video file not found: .*gone.mp4"):
        proc([{"role": "user", "content": [{"type": "video", "path": str(tmp_path / "gone.mp4")}]}])


def test_unknown_content_type(proc):
    with pytest.raises(ProcessorError, match="message 0, item 1: unknown content type 'audio'"):
        proc([{"role": "user", "content": [{"type": "text", "text": "listen"}, {"type": "audio", "path": "a.wav"}]}])


def test_malformed_messages(proc):
    with pytest.raises(ProcessorError, match="expected a dict with a 'role'"):
        proc([{"content": "no role"}])
    with pytest.raises(ProcessorError, match="text item needs a string"):
        proc([{"role": "user", "content": [{"type": "text"}]}])


def test_more_placeholders_than_images(proc, good_png):
    with pytest.raises(ProcessorError, match="2 <image> and 0 <video> placeholders but the messages hold 1 images"):
        proc(image_message(str(good_png), text="look at <image> too"))
    with pytest.raises(ProcessorError, match="1 <image> .* hold 0 images"):
        proc([{"role": "user", "content": [{"type": "text", "text": "<image> without an image"}]}])


def test_prompt_longer_than_context(processor_dir, good_png):
    proc = Processor.from_pretrained(processor_dir, context_length=500)
    with pytest.raises(ProcessorError, match=r"prompt is 872 tokens, longer than the model's context of 500"):
        proc(image_message(str(good_png)))
    # the same image unsplit fits
    assert proc(image_message(str(good_png)), do_image_splitting=False)["input_ids"].shape[1] < 500


def test_missing_image_seq_len(processor_dir, tmp_path):
    directory = copy_dir(processor_dir, tmp_path)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor"}))
    with pytest.raises(ProcessorError, match="image_seq_len"):
        Processor.from_pretrained(directory)


def test_missing_tile_size(processor_dir, tmp_path):
    directory = copy_dir(processor_dir, tmp_path)
    config = json.loads((directory / "preprocessor_config.json").read_text())
    del config["max_image_size"]
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ProcessorError, match="preprocessor_config.json: `max_image_size`"):
        Processor.from_pretrained(directory)


def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and no cached copy
    with pytest.raises(ProcessorError, match="not a local directory and could not be fetched"):
        Processor.from_pretrained("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")


def test_missing_directory(tmp_path):
    with pytest.raises(ProcessorError, match="processor directory not found: .*absent"):
        Processor.from_pretrained(tmp_path / "absent")


def test_bad_padding_side(proc):
    with pytest.raises(ProcessorError, match="padding_side"):
        proc([{"role": "user", "content": "hi"}], padding_side="middle")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["video_sampling"].update(fps=float("nan")), "video fps"),
        (lambda c: c["video_sampling"].update(fps=-1), "video fps"),
        (lambda c: c["video_sampling"].update(max_frames=0), "max_frames"),
        (lambda c: c.update(rescale_factor=float("nan")), "rescale_factor"),
        (lambda c: c.update(image_std=[0.5, 0.0, 0.5]), "std non-zero"),
        (lambda c: c.update(image_mean=[float("inf")] * 3), "image_mean"),
        (lambda c: c.update(size={"longest_edge": 0}), "positive"),
    ],
    ids=["fps-nan", "fps-negative", "max-frames-0", "rescale-nan", "std-zero", "mean-inf", "size-0"],
)
def test_bad_numbers_in_the_preprocessor_config_fail_on_load(processor_dir, tmp_path, edit, match):
    directory = copy_dir(processor_dir, tmp_path)
    config = json.loads((directory / "preprocessor_config.json").read_text())
    edit(config)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))  # NaN/Infinity as JSON allows
    with pytest.raises(ProcessorError, match=match):
        Processor.from_pretrained(directory)


def test_a_zero_image_seq_len_fails_on_load(processor_dir, tmp_path):
    directory = copy_dir(processor_dir, tmp_path)
    (directory / "processor_config.json").write_text(json.dumps({"image_seq_len": 0}))
    with pytest.raises(ProcessorError, match="image_seq_len"):
        Processor.from_pretrained(directory)
