"""Hostile inputs found by a red-team pass over issue 11 (each once misbehaved): every one now raises
an error naming the problem, at the door where it can, and the engine keeps serving the others.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conversations import user
from smolvlm.engine import Engine, ImageInput, PromptInputs, RequestError, SamplingParams
from smolvlm.processing import Processor, ProcessorError
from smolvlm.processing import chat_template as template_module
from smolvlm.processing import image as image_module

PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, attention_backend="torch", cpu_kernels="torch", num_kv_blocks=64)


@pytest.fixture(scope="module")
def good(engine):
    return user("Hello there"), engine.generate([user("Hello there")], PARAMS)[0].token_ids


def assert_serving(engine, good):
    conversation, tokens = good
    assert engine.generate([conversation], PARAMS)[0].token_ids == tokens
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not engine.requests and not engine._mailbox


IMG = 49190  # the tiny checkpoint's <image> id, checked below


def hand_made(engine):
    image = engine.model.config.image_token_id
    assert image == IMG
    tile = torch.zeros(1, 3, 64, 64)
    ids = [5] * 16 + [image] * 16 + [5]
    return {
        "float ids": (PromptInputs([5.0] * 16), "input_ids must be ints"),
        "bool id": (PromptInputs([True, 5]), "input_ids must be ints"),
        "string id": (PromptInputs(["a"]), "input_ids must be ints"),
        "None ids": (PromptInputs(None), "non-empty list of ints"),
        "tensor ids": (PromptInputs(torch.tensor([1, 2])), "non-empty list of ints"),
        "surrogate hash": (PromptInputs(ids, [ImageInput(tile, "\udcff")]), "content_hash is not valid Unicode"),
        "32 px tile": (PromptInputs(ids, [ImageInput(torch.zeros(1, 3, 32, 32), "h")]), "should be (n_tiles >= 1, 3, 64, 64)"),
        "128 px tile": (PromptInputs(ids, [ImageInput(torch.zeros(1, 3, 128, 128), "h")]), "should be (n_tiles >= 1, 3, 64, 64)"),
        "zero tiles": (PromptInputs(ids, [ImageInput(torch.zeros(0, 3, 64, 64), "h")]), "n_tiles >= 1"),
        "numpy pixels": (PromptInputs(ids, [ImageInput(np.zeros((1, 3, 64, 64), np.float32), "h")]), "torch.Tensor"),
        "int pixels": (PromptInputs(ids, [ImageInput(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "h")]), "floating-point"),
        "images not a list": (PromptInputs(ids, ImageInput(tile, "h")), "list of ImageInput"),
        "images [None]": (PromptInputs(ids, [None]), "list of ImageInput"),
    }


def test_malformed_prompt_inputs_are_refused_at_admission(engine, good):
    for name, (prompt, message) in hand_made(engine).items():
        for call in (lambda: engine.add_request(prompt, PARAMS), lambda: engine.stream(prompt, PARAMS)):
            with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
                call()
        [result] = engine.generate([prompt], PARAMS)
        assert result.finish_reason == "error" and message in result.error, (name, result.error)
        assert_serving(engine, good)
    with pytest.raises(TypeError, match="request_id must be an int"):
        engine.abort(None)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=4, temperature=1e-300),
                                    SamplingParams(max_new_tokens=4, temperature=0.7, repetition_penalty=1e-300, seed=1)],
                         ids=["tiny-temperature", "tiny-penalty"])
def test_settings_that_overflow_the_logits_fail_their_request_alone(engine, good, params):
    conversation, tokens = good
    ok, bad = engine.generate([conversation, conversation], [PARAMS, params])
    assert ok.token_ids == tokens
    assert bad.finish_reason == "error" and "no token could be sampled" in bad.error, bad
    assert_serving(engine, good)


@pytest.mark.parametrize("source, reason", [
    ("{% set w = messages|length*300000000 %}{% set a = ('%0' ~ w ~ 'd') % 1 %}x", "%-format"),
    ("{{ ('x'|center(1000000000))|length }}", "center filter"),  # folded while compiling
    ("{% set n = messages|length %}{{ 'x'|center(n * 300000000) }}", "center filter"),
    ("{{ 'ab'|indent(100000000) }}", "indent filter"),
    ("{% set b = 2 ** 100000 %}{{ b ** 1000 }}", "a power of"),
    ("{% set b = 2 ** 100000 %}{{ b }}", "ValueError"),  # too many digits to print: named, not bare
])
def test_template_escapes_are_stopped(processor_dir, source, reason):
    processor = Processor.from_pretrained(processor_dir)
    hostile = Processor(processor.tokenizer, __import__("dataclasses").replace(processor.config, chat_template=source))
    with pytest.raises(ProcessorError, match="the chat template") as info:
        hostile.render(user("hi"))
    assert reason in str(info.value)


def test_a_cyclic_or_very_deep_conversation_is_named(engine):
    cyclic = {"role": "user", "content": "hi"}
    cyclic["self"] = cyclic
    deep: dict = {"role": "user", "content": "hi"}
    inner = deep
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    for conversation in ([cyclic], [deep]):
        with pytest.raises(ProcessorError, match="nested too deeply"):
            engine.stream(conversation, PARAMS)


@pytest.mark.parametrize("message, match", [
    ({"role": ["user"], "content": "hi"}, "'role' must be a non-empty string"),
    ({"role": 5, "content": "hi"}, "'role' must be a non-empty string"),
    ({"role": "user", "content": []}, "content is empty"),
])
def test_roles_and_content_are_checked(engine, message, match):
    with pytest.raises(ProcessorError, match=match):
        engine.prepare([message])


def test_options_with_absurd_values_are_refused(engine, short_video):
    video = [{"role": "user", "content": [{"type": "video", "path": str(short_video)}]}]
    with pytest.raises(ProcessorError, match="video_fps must be at most 1000"):
        engine.generate([video], PARAMS, video_fps=1e308)
    with pytest.raises(ProcessorError, match="video_max_frames must be at most 10000"):
        engine.stream(video, PARAMS, video_max_frames=10**10)


def _serve_once(respond):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(10)
    seen = []

    def loop():
        try:
            conn, _ = listener.accept()
            seen.append(__import__("time").monotonic())  # when someone connected
            respond(conn)
            conn.close()
        except OSError:
            pass
        listener.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def test_redirects_go_to_http_only(monkeypatch):
    monkeypatch.setattr(image_module, "URL_TIMEOUT_S", 5.0)
    ftp_port, ftp_seen, ftp_thread = _serve_once(lambda conn: conn.sendall(b"220 hello\r\n"))
    http_port, _, http_thread = _serve_once(lambda conn: conn.sendall(
        f"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:{ftp_port}/x.png\r\nContent-Length: 0\r\n\r\n".encode()))
    with pytest.raises(ProcessorError, match="redirects to 'ftp://"):
        image_module.load_image({"type": "image", "url": f"http://127.0.0.1:{http_port}/x.png"})
    refused_at = __import__("time").monotonic()
    http_thread.join(10)
    socket.create_connection(("127.0.0.1", ftp_port), timeout=5).close()  # release the FTP listener
    ftp_thread.join(10)
    assert len(ftp_seen) == 1 and ftp_seen[0] > refused_at, "the redirect to ftp:// was followed"


@pytest.mark.parametrize("url", ["data:image/png;base64", "http://[::1", "http://\u2603.x/", "http://a.b/\r\nX: y",
                                 "http://127.0.0.1:abc/x.png"])
def test_malformed_urls_are_named(url):
    with pytest.raises(ProcessorError, match="data: URI needs a ','|not a valid URL|cannot fetch"):
        image_module.load_image({"type": "image", "url": url})


def test_size_caps_cover_data_uris_and_arrays(monkeypatch):
    monkeypatch.setattr(image_module, "URL_MAX_BYTES", 1000)
    with pytest.raises(ProcessorError, match="larger than the 1000-byte limit"):
        image_module.load_image({"type": "image", "url": "data:image/png;base64," + "A" * 5000})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ProcessorError, match="larger than 10000"):
        image_module.load_image({"type": "image", "image": np.zeros((200, 200), np.uint8)})


def test_long_names_and_broken_pil_images_are_named(engine, tmp_path):
    long_name = "/" + "a" * 300
    for trusted, match in ((True, "cannot read image file"), (False, "cannot open image file")):
        [result] = engine.generate([[{"role": "user", "content": [{"type": "image", "path": long_name}]}]], PARAMS,
                                   trusted=trusted)
        assert result.finish_reason == "error" and match in result.error, result.error
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[:-30])
    lazy = Image.open(path)  # opened, not decoded: the truncation shows later
    closed = Image.open(io.BytesIO(buffer.getvalue()))
    closed.close()
    for image in (lazy, closed):
        with pytest.raises(ProcessorError, match="the PIL image cannot be read"):
            engine.prepare([{"role": "user", "content": [{"type": "image", "image": image}]}])


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(image_mean=["a", "b", "c"]), "malformed value"),
    (lambda c: c.update(max_image_size={"longest_edge": 64.7}), "whole number"),
    (lambda c: c.update(max_image_size={"longest_edge": "abc"}), "whole number"),
    (lambda c: c.update(resample=99), "PIL filter code"),
    (lambda c: c["video_sampling"].update(fps="x"), "malformed value"),
])
def test_malformed_processor_configs_fail_on_load_by_name(processor_dir, tmp_path, edit, match):
    for f in processor_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    edit(config)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ProcessorError, match=match):
        Processor.from_pretrained(tmp_path)


def test_the_triton_backend_is_refused_on_cpu_outside_the_interpreter(tiny_ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_backend='triton' runs on CUDA"):
        Engine.from_pretrained(tiny_ckpt, attention_backend="triton", cpu_kernels="torch")


def smolvlm(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "smolvlm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.mark.parametrize("flags, named", [(["--device", "bogus"], "--device"), (["--device", "cuda:7"], "--device"),
                                          (["--kv-cache-gb", "1e-12"], "--kv-cache-gb"),
                                          (["--video-max-frames", "10000000000"], "--video-max-frames"),
                                          (["--video-fps", "1e308"], "--video-fps"),
                                          (["--attention-backend", "triton", "--device", "cpu"], "--attention-backend")])
def test_more_bad_flags_fail_before_the_model_loads(flags, named, tmp_path):
    out = smolvlm("run", "--model", str(tmp_path / "no-model"), *flags, "Hello")
    assert out.returncode == 1 and named in out.stderr and "checkpoint" not in out.stderr.lower(), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_chat_names_unknown_commands_and_empty_paths(tiny_ckpt):
    out = smolvlm("chat", "--model", str(tiny_ckpt), "--cpu-kernels", "torch", "-n", "3",
                  stdin="/bogus\n/image\nHi\n")
    assert out.returncode == 0, out.stderr
    assert "unknown command /bogus" in out.stderr and "usage: /image PATH" in out.stderr
    assert len([line for line in out.stdout.splitlines() if line.strip()]) == 1  # only "Hi" was asked


def test_api_edges_are_named(engine, tiny_ckpt, tmp_path):
    processor = engine.processor
    with pytest.raises(ProcessorError, match="add_generation_prompt must be True or False"):
        processor.prepare(user("Hi"), "yes")
    with pytest.raises(ProcessorError, match="at least one conversation"):
        processor.collate([])
    with pytest.raises(ProcessorError, match="non-negative int token ids"):
        processor.decode([-1])
    with pytest.raises(ProcessorError, match="non-negative int token ids"):
        processor.decode(None)
    assert processor.decode(np.array([40, 41])) == processor.decode([40, 41])
    from smolvlm import SmolVLM
    from smolvlm.config import ConfigError

    assert SmolVLM.from_pretrained(tiny_ckpt, dtype="float32").dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be"):
        SmolVLM.from_pretrained(tiny_ckpt, dtype="float64")
    for f in tiny_ckpt.iterdir():
        if f.is_file() and f.suffix == ".json":
            shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    for section, value, match in (("text_config", [1], "text_config"), ("vision_config", "big", "vision_config")):
        broken = {**config, section: value}
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=match):
            SmolVLM.from_pretrained(tmp_path)
