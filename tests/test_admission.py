"""Cheap checks before expensive work, and media read beside the model steps (issue 11, second part).

- the prompt's length comes from the media's sizes (image headers, video containers) before any pixel
  is made: 1,000 images or 48 photo-size ones over the context fail without decoding one;
- processor options are checked at the door (type, range, NaN), never clamped;
- an untrusted caller cannot tell a missing local file from an unreadable one;
- a checkpoint's chat template cannot hang the process or fill memory;
- one slow URL does not stall the other requests of a `generate` call, and a thread reading media
  does not hold the engine.
No wall-time assertions: "before any decoding" is checked by counting decodes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conversations import user
from smolvlm.engine import Engine, SamplingParams
from smolvlm.processing import Processor, ProcessorError
from smolvlm.processing import chat_template as template_module
from smolvlm.processing import image as image_module
from smolvlm.processing import processor as processor_module

PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, attention_backend="torch", cpu_kernels="torch", num_kv_blocks=256)


@pytest.fixture(scope="module")
def processor(processor_dir):
    # the real SmolVLM2 settings: 512 px tiles, 64 tokens each, an 8192-token context
    return Processor.from_pretrained(processor_dir, context_length=8192)


def images_message(sources, text="Describe these."):
    return [{"role": "user", "content": [*({"type": "image", **s} for s in sources), {"type": "text", "text": text}]}]


def png_bytes(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def assert_idle(engine):
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not engine.requests and not engine._owner


# ---------------------------------------------------------------------------------------------
# The prompt's length before pixels
# ---------------------------------------------------------------------------------------------


def test_a_thousand_images_fail_before_one_is_opened(engine, monkeypatch):
    opened = count_calls(monkeypatch, processor_module, "open_image")
    tiny = np.zeros((8, 8, 3), dtype=np.uint8)
    conversation = images_message([{"image": tiny}] * 1000)
    start = time.perf_counter()
    with pytest.raises(ProcessorError, match=r"1000 images and videos need at least 16000 tokens"):
        engine.prepare(conversation)
    print(f"1,000 images rejected in {1000 * (time.perf_counter() - start):.1f} ms")
    assert not opened, f"{len(opened)} images were opened before the count check"
    good = user("Hi")
    solo = engine.generate([good], PARAMS)[0]
    bad, ok = engine.generate([conversation, good], PARAMS)
    assert bad.finish_reason == "error" and "at least 16000 tokens" in bad.error and ok.token_ids == solo.token_ids
    assert_idle(engine)


def test_photo_size_images_over_the_context_fail_before_any_pixel(processor, monkeypatch):
    photo = png_bytes(2048, 1536)  # 4 x 3 tiles + the global one: 13 x 64 = 832 image tokens each
    one = processor.prepare(images_message([{"image": photo}]))
    per_image = len(one.input_ids)
    decoded = count_calls(monkeypatch, image_module.OpenedImage, "rgb")
    start = time.perf_counter()
    with pytest.raises(ProcessorError, match=r"the prompt is \d+ tokens, longer than the model's context of 8192"):
        processor.prepare(images_message([{"image": photo}] * 48))
    print(f"48 photo-size images rejected in {1000 * (time.perf_counter() - start):.1f} ms")
    assert not decoded, "pixels were decoded before the length check"
    # The count from the header is the count the pixels give: one token over the limit is refused, at the limit not.
    tight = Processor(processor.tokenizer, dataclasses.replace(processor.config, context_length=per_image - 1))
    with pytest.raises(ProcessorError, match=f"the prompt is {per_image} tokens"):
        tight.prepare(images_message([{"image": photo}]))
    assert not decoded
    exact = Processor(processor.tokenizer, dataclasses.replace(processor.config, context_length=per_image))
    assert exact.prepare(images_message([{"image": photo}])).input_ids == one.input_ids


def rotated_jpeg(photo: Image.Image) -> bytes:
    """The photo stored turned a quarter, with the EXIF orientation (6) that turns it back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photo.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("exif_in_header", [True, False], ids=["exif-in-header", "exif-seen-only-when-decoded"])
def test_exif_rotated_images_get_the_grid_of_their_upright_size(processor, photos, monkeypatch, exif_in_header):
    data = rotated_jpeg(photos["coffee"])  # upright 600 x 400 (landscape), stored 400 x 600
    upright = Image.open(io.BytesIO(data))
    upright = __import__("PIL.ImageOps", fromlist=["x"]).exif_transpose(upright).convert("RGB")
    assert upright.size == (600, 400)
    expected = processor.prepare(images_message([{"image": upright}]))
    if not exif_in_header:  # as for a PNG whose eXIf chunk follows its pixels: the size guess is wrong
        monkeypatch.setattr(image_module, "_exif_orientation", lambda image: 1)
    item = processor.prepare(images_message([{"image": data}]))
    assert (item.media[0].rows, item.media[0].cols) == (expected.media[0].rows, expected.media[0].cols) == (3, 4)
    assert item.input_ids == expected.input_ids


def test_a_video_over_the_limit_fails_before_its_frames_are_decoded(engine, long_video, monkeypatch):
    decoded = count_calls(monkeypatch, processor_module, "read_frames")
    conversation = [{"role": "user", "content": [{"type": "video", "path": str(long_video)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ProcessorError, match=r"the prompt is \d+ tokens, longer than the prompt limit of 500"):
        engine.prepare(conversation, max_prompt_tokens=500)  # 64 frames x 16 tokens
    assert not decoded
    assert len(engine.prepare(conversation).images[0].pixel_values) == 64 and len(decoded) == 1


# ---------------------------------------------------------------------------------------------
# Options at the door
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [("video_fps", -1), ("video_fps", math.nan), ("video_fps", math.inf), ("video_fps", 0), ("video_fps", True),
     ("video_max_frames", 0), ("video_max_frames", 2.5), ("video_max_frames", "8"), ("image_longest_edge", 0),
     ("image_longest_edge", 10**9), ("do_image_splitting", "no"), ("max_prompt_tokens", 0)],
)
def test_processor_options_are_checked_never_clamped(engine, option, value):
    with pytest.raises(ProcessorError, match=option):
        engine.processor.prepare(user("Hi"), **{option: value})
    with pytest.raises((ProcessorError, TypeError), match=option):  # the whole call, before any work
        engine.generate([user("Hi")], PARAMS, **{option: value})
    assert_idle(engine)


def test_an_unknown_option_is_named(engine):
    with pytest.raises(TypeError, match="video_fsp"):
        engine.generate([user("Hi")], PARAMS, video_fsp=2)
    with pytest.raises(TypeError, match="trusted must be True or False"):
        engine.stream(user("Hi"), PARAMS, trusted="no")


# ---------------------------------------------------------------------------------------------
# Untrusted callers
# ---------------------------------------------------------------------------------------------


def test_for_an_untrusted_caller_missing_and_unreadable_files_look_the_same(processor, tmp_path, short_video):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(300, 200)[:400])  # a valid header, pixels cut off
    a_directory = tmp_path / "folder.png"
    a_directory.mkdir()
    cases = {"missing": tmp_path / "missing.png", "not-an-image": not_an_image, "truncated": truncated,
             "directory": a_directory}

    def error(path, trusted):
        with pytest.raises(ProcessorError) as info:
            processor.prepare(images_message([{"path": str(path)}]), trusted=trusted)
        return str(info.value).replace(str(path), "PATH")

    trusted = {name: error(path, True) for name, path in cases.items()}
    assert len(set(trusted.values())) > 1, trusted  # a trusted caller is told what is wrong
    untrusted = {name: error(path, False) for name, path in cases.items()}
    assert set(untrusted.values()) == {"cannot open image file 'PATH'"}, untrusted

    def video_error(path):
        with pytest.raises(ProcessorError) as info:
            processor.prepare([{"role": "user", "content": [{"type": "video", "path": str(path)}]}], trusted=False)
        return str(info.value).replace(str(path), "PATH")

    assert {video_error(tmp_path / "missing.mp4"), video_error(not_an_image)} == {"cannot open video file 'PATH'"}
    good = processor.prepare([{"role": "user", "content": [{"type": "video", "path": str(short_video)}]}], trusted=False)
    assert len(good.media) == 1  # readable files still work


# ---------------------------------------------------------------------------------------------
# The chat template's limits
# ---------------------------------------------------------------------------------------------


RUNAWAY_TEMPLATES = {
    "nested-loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "ran for more"),
    "string-repeat": ("{{ 'x' * 10000000000 }}", "repetition"),
    "huge-power": ("{% set n = 7 %}{{ n ** 100000000 }}", "too large"),
    "doubling": ("{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
                 "built a value"),
    "long-output": ("{% for a in range(100) %}{{ 'y' * 100000 }}{% endfor %}", "output passed"),
    "center": ("{{ 'a'.center(10000000000) }}", "count over"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
}


@pytest.mark.parametrize("name", RUNAWAY_TEMPLATES)
def test_a_runaway_chat_template_is_stopped(processor, monkeypatch, name):
    source, reason = RUNAWAY_TEMPLATES[name]
    # Only the nested loops need the clock; the others hit their own limit at once, and on a loaded
    # machine a 0.5 s clock could stop them first (the recursion case did, in CI), naming the wrong reason.
    monkeypatch.setattr(template_module, "TEMPLATE_TIME_LIMIT_S", 0.5 if reason == "ran for more" else 30.0)
    hostile = Processor(processor.tokenizer, dataclasses.replace(processor.config, chat_template=source))
    outcome = {}

    def render():
        try:
            hostile.prepare(user("Hi"))
        except ProcessorError as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(60)  # a liveness bound (the limit is 0.5 s), not a speed claim
    assert not worker.is_alive(), "the template was not stopped"
    assert "the chat template was stopped" in outcome.get("error", "") and reason in outcome["error"], outcome
    assert processor.prepare(user("Hi")).input_ids  # the checkpoint's own template still renders


def test_the_limits_leave_a_debugger_s_trace_function_in_place(processor):
    import sys

    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        processor.prepare(user("Hi"))
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


# ---------------------------------------------------------------------------------------------
# Media read beside the model steps
# ---------------------------------------------------------------------------------------------


def test_the_model_steps_while_a_url_is_still_downloading(engine, monkeypatch, tmp_path, photos):
    photo = tmp_path / "cat.png"
    photos["chelsea"].save(photo)
    good = [user("Write a long story."), user("Hi")]
    by_path = images_message([{"path": str(photo)}])
    solo = [engine.generate([c], PARAMS)[0].token_ids for c in [*good, by_path]]
    steps_seen = []

    def slow_fetch(url, *args, **kwargs):  # answers only once the engine has stepped the other requests
        start = engine.stats.steps
        for _ in range(2000):
            if engine.stats.steps >= start + 4:
                break
            time.sleep(0.01)
        steps_seen.append(engine.stats.steps - start)
        return photo.read_bytes()

    monkeypatch.setattr(image_module, "fetch_url", slow_fetch)
    by_url = images_message([{"url": "http://127.0.0.1:9/cat.png"}])
    results = engine.generate([good[0], by_url, good[1]], PARAMS)
    assert steps_seen and steps_seen[0] >= 4, f"the engine made {steps_seen} steps while the URL was read"
    assert [r.token_ids for r in results] == [solo[0], solo[2], solo[1]]
    assert_idle(engine)


def test_a_drip_fed_url_fails_alone_within_its_deadline(engine, monkeypatch):
    from test_engine_lifecycle import _drip, _serve

    monkeypatch.setattr(image_module, "URL_TIMEOUT_S", 1.0)
    good = [user("Write a long story."), user("Hi")]
    solo = [engine.generate([c], PARAMS)[0].token_ids for c in good]
    port, stop = _serve(_drip)
    try:
        results = engine.generate([images_message([{"url": f"http://127.0.0.1:{port}/x.png"}]), *good], PARAMS)
    finally:
        stop()
    assert results[0].finish_reason == "error" and "within 1 s" in results[0].error, results[0]
    assert [r.token_ids for r in results[1:]] == solo
    assert_idle(engine)


def test_a_thread_reading_media_does_not_hold_the_engine(engine, monkeypatch, tmp_path, photos):
    photo = tmp_path / "cat.png"
    photos["chelsea"].save(photo)
    inside, release = threading.Event(), threading.Event()

    def blocking_fetch(url, *args, **kwargs):
        inside.set()
        release.wait(30)
        return photo.read_bytes()

    monkeypatch.setattr(image_module, "fetch_url", blocking_fetch)
    streamed = {}

    def stream_in_thread():
        stream = engine.stream(images_message([{"url": "http://127.0.0.1:9/cat.png"}]), PARAMS)
        streamed["text"] = "".join(stream)
        streamed["result"] = stream.result

    worker = threading.Thread(target=stream_in_thread, daemon=True)
    worker.start()
    try:
        assert inside.wait(30)
        [other] = engine.generate([user("Hi")], PARAMS)  # no "used by another thread" error
        assert other.finish_reason == "length"
    finally:
        release.set()
    worker.join(60)
    assert streamed["result"].finish_reason == "length" and streamed["text"] == streamed["result"].text
    assert_idle(engine)
