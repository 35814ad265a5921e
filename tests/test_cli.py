"""`smolvlm run` and `smolvlm chat` as a user types them: real subprocesses on the tiny checkpoint.

Each start imports torch (seconds), so the cases are few and each checks several things.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smolvlm.engine import Engine, SamplingParams


def smolvlm_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m smolvlm.cli`."""
    script = Path(sys.executable).with_name("smolvlm")
    if script.exists():
        return [str(script)]
    found = shutil.which("smolvlm")
    return [found] if found else [sys.executable, "-m", "smolvlm.cli"]


def smolvlm(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*smolvlm_command(), *args], input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def image_path(photos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "astronaut.png"
    photos["astronaut"].save(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, attention_backend="torch", num_kv_blocks=256)


def test_help_explains_the_commands():
    top = smolvlm("--help")
    assert top.returncode == 0 and "run" in top.stdout and "chat" in top.stdout and "--model" not in top.stderr
    run = smolvlm("run", "--help")
    for option in ("--model", "--image", "--video", "--dtype", "--device", "--max-new-tokens", "--temperature",
                   "--top-p", "--top-k", "--seed", "--no-image-splitting", "--stop", "--debug"):
        assert option in run.stdout, f"`smolvlm run --help` does not mention {option}"
    assert "HuggingFaceTB/SmolVLM2-256M-Video-Instruct" in run.stdout


def test_run_streams_the_same_answer_as_the_engine(tiny_ckpt, image_path, engine):
    out = smolvlm("run", "--model", str(tiny_ckpt), "--image", str(image_path), "-n", "12", "--stats",
                  "What is in this picture?")
    assert out.returncode == 0, out.stderr
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(image_path)},
                                                  {"type": "text", "text": "What is in this picture?"}]}]
    [expected] = engine.generate([conversation], SamplingParams(max_new_tokens=12))
    assert out.stdout == expected.text + "\n"
    assert "12 new tokens" in out.stderr and "Traceback" not in out.stderr


def test_bad_image_path_fails_cleanly(tiny_ckpt, tmp_path):
    missing = tmp_path / "no-such-photo.jpg"
    out = smolvlm("run", "--model", str(tiny_ckpt), "--image", str(missing), "Describe it.")
    assert out.returncode == 1
    assert "no-such-photo.jpg" in out.stderr and "error" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not an image")
    out = smolvlm("run", "--model", str(tiny_ckpt), "--image", str(corrupt), "Describe it.")
    assert out.returncode == 1 and "corrupt.png" in out.stderr and "Traceback" not in out.stderr
    debug = smolvlm("run", "--model", str(tiny_ckpt), "--image", str(corrupt), "--debug", "Describe it.")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_offline_without_a_cache_says_how_to_use_a_local_model(tmp_path):
    out = smolvlm("run", "Hello", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "HuggingFaceTB/SmolVLM2-256M-Video-Instruct" in out.stderr and "local" in out.stderr, out.stderr


def test_chat_keeps_the_conversation_and_reuses_the_cached_prefix(tiny_ckpt, image_path, engine):
    questions = ["What is in this picture? Please describe every detail.", "And what colour is the suit?"]
    out = smolvlm("chat", "--model", str(tiny_ckpt), "--image", str(image_path), "-n", "10", "--stats",
                  stdin="\n".join(questions) + "\n")
    assert out.returncode == 0, out.stderr
    answers = out.stdout.split("\n")[:2]
    # The same two turns through the library: the second question sees the first answer.
    first = [{"role": "user", "content": [{"type": "image", "path": str(image_path)},
                                          {"type": "text", "text": questions[0]}]}]
    [a] = engine.generate([first], SamplingParams(max_new_tokens=10))
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": a.text.strip()}]},
                      {"role": "user", "content": [{"type": "text", "text": questions[1]}]}]
    [b] = engine.generate([second], SamplingParams(max_new_tokens=10))
    assert answers == [a.text, b.text]
    stats = [line for line in out.stderr.splitlines() if "prefix cache" in line]
    assert len(stats) == 2 and " 0 from the prefix cache" in stats[0]
    cached = int(stats[1].split(",")[1].split()[0])
    assert cached > 300, f"the second turn should reuse the image's blocks: {stats[1]}"


def test_chat_survives_a_failed_turn_a_non_utf8_line_and_reset(tiny_ckpt, engine, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    lines = [
        f"/image {corrupt}".encode(),
        b"What is in it?",  # fails: the image is corrupt; the turn is dropped with its image
        b"caf\xe9 \xff is not UTF-8",  # a bad line: answered, not the end of the session
        b"/image " + str(corrupt).encode(),
        b"/reset",  # clears the pending image too
        b"What is the capital of France?",
    ]
    out = subprocess.run([*smolvlm_command(), "chat", "--model", str(tiny_ckpt), "-n", "6"],
                         input=b"\n".join(lines) + b"\n", capture_output=True, timeout=120)
    stderr = out.stderr.decode(errors="replace")
    assert out.returncode == 0, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt" in errors[0] and "dropped" in errors[0], stderr
    answers = out.stdout.decode().split("\n")
    # after /reset, the last question is a fresh conversation
    fresh = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    [expected] = engine.generate([fresh], SamplingParams(max_new_tokens=6))
    assert answers[1] == expected.text, (answers, expected.text)
    # the non-UTF-8 line was asked (with U+FFFD for the bad bytes) after the failed turn, whose image is gone
    bad = [{"role": "user", "content": [{"type": "text", "text": "caf\ufffd \ufffd is not UTF-8"}]}]
    [first] = engine.generate([bad], SamplingParams(max_new_tokens=6))
    assert answers[0] == first.text, (answers, first.text)


@pytest.mark.parametrize("flags, named", [(["-t", "nan"], "temperature"), (["--seed", str(2**70)], "seed"),
                                          (["--kv-cache-gb", "nan"], "--kv-cache-gb"), (["--top-p", "0"], "top_p"),
                                          (["--video-fps", "-1"], "--video-fps"), (["--video-fps", "nan"], "--video-fps"),
                                          (["--video-max-frames", "0"], "--video-max-frames")])
def test_bad_flags_fail_before_the_model_loads(flags, named, tmp_path):
    # the model path does not exist: reaching the loader would print a checkpoint error instead
    out = smolvlm("run", "--model", str(tmp_path / "no-model"), *flags, "Hello")
    assert out.returncode == 1 and named in out.stderr and "checkpoint" not in out.stderr.lower(), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
