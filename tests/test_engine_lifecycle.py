"""Every request ends exactly once and gives its blocks back, whatever happens around it (issue 11, part).

Faults as users meet them: bad requests among good ones, an interrupt inside `generate`, a failing
model step, non-finite logits, a stream paused while `generate` runs, two streams interleaved, a
second thread. After each: the good answers equal their solo answers, the pool is empty, the next
call behaves.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from conversations import user
from smolvlm.engine import Engine, RequestError, SamplingParams

PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, attention_backend="torch", cpu_kernels="torch", num_kv_blocks=256)


@pytest.fixture(scope="module")
def good():
    return [user("Write a long story about a cat and a dog."), user("What is the capital of France?"), user("Hi")]


@pytest.fixture(scope="module")
def solo(engine, good):
    return [engine.generate([c], PARAMS)[0] for c in good]


def assert_idle(engine):
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks, f"{manager.num_used_blocks} blocks still held"
    assert not engine.requests and not engine.has_unfinished()
    assert not engine._mailbox and not engine._owner, "outputs or owners left behind"


def assert_behaves(engine, good, solo):
    results = engine.generate(good, PARAMS)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]
    assert_idle(engine)


def test_bad_requests_fail_alone(engine, good, solo):
    bad = [
        user("a lone surrogate \ud800 in the text"),
        [{"role": "user", "content": [{"type": "image", "image": np.zeros((0, 0, 3), dtype=np.uint8)},
                                      {"type": "text", "text": "zero-size image"}]}],
        [{"role": "user", "content": [{"type": "image", "path": "/nonexistent/cat.png"}]}],
    ]
    batch = [bad[0], good[0], bad[1], good[1], bad[2], good[2]]
    results = engine.generate(batch, PARAMS)
    for i in (0, 2, 4):
        assert results[i].finish_reason == "error" and results[i].error.startswith(f"conversation {i}:"), results[i]
    assert "not valid Unicode" in results[0].error and "'\\ud800' at character 17" in results[0].error, results[0]
    assert "numpy image is empty" in results[2].error and "not found" in results[4].error, results
    assert [results[i].token_ids for i in (1, 3, 5)] == [r.token_ids for r in solo]
    assert_idle(engine)
    assert_behaves(engine, good, solo)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", math.nan), ("top_p", math.nan), ("repetition_penalty", math.nan), ("temperature", math.inf),
     ("top_p", 0.0), ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("seed", 2**70), ("seed", -1), ("top_k", True),
     ("stop", ("",)), ("stop_token_ids", (-3,)), ("ignore_eos", "yes")],
)
def test_sampling_params_are_checked_at_the_door(field, value):
    with pytest.raises((TypeError, ValueError), match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_generate_rejects_a_string_clearly(engine):
    with pytest.raises(TypeError, match="list of conversations"):
        engine.generate("hello")


def test_keyboard_interrupt_inside_generate_leaves_nothing_behind(engine, good, solo, monkeypatch):
    calls = {"n": 0}
    real = engine.runner.execute

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(good, PARAMS)
    monkeypatch.undo()
    assert_idle(engine)
    assert_behaves(engine, good, solo)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, good, solo, monkeypatch):
    real = engine.runner.execute
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", broken)
    results = engine.generate(good, PARAMS)
    monkeypatch.undo()
    assert all(r.finish_reason == "error" and "kernel exploded" in r.error for r in results), results
    assert_idle(engine)
    assert_behaves(engine, good, solo)


def test_non_finite_logits_fail_their_request_alone(engine, good, solo):
    def poison_first_row(module, args, output):
        if output.shape[0] == 2:  # a decode step of both requests: the first row is the first request's
            output = output.clone()
            output[0] = math.nan
            return output
        return None

    handle = engine.model.lm_head.register_forward_hook(poison_first_row)
    try:
        results = engine.generate(good[:2], PARAMS)
    finally:
        handle.remove()
    failed = [r for r in results if r.finish_reason == "error"]
    assert len(failed) == 1 and "not finite" in failed[0].error, results
    ok = [i for i, r in enumerate(results) if r.finish_reason != "error"]
    assert [results[i].token_ids for i in ok] == [solo[i].token_ids for i in ok]
    assert_idle(engine)
    assert_behaves(engine, good, solo)


def test_a_stream_paused_while_generate_runs_loses_no_text(engine, good, solo):
    stream = engine.stream(good[0], PARAMS)
    first = next(stream)
    [other] = engine.generate([good[1]], PARAMS)  # steps the paused stream's request too
    rest = "".join(stream)
    assert first + rest == solo[0].text and stream.result.token_ids == solo[0].token_ids
    assert other.token_ids == solo[1].token_ids
    assert_idle(engine)


def test_two_interleaved_streams_lose_no_text(engine, good, solo):
    streams = [engine.stream(good[0], PARAMS), engine.stream(good[1], PARAMS)]
    texts = ["", ""]
    live = [0, 1]
    while live:
        for i in list(live):
            try:
                texts[i] += next(streams[i])
            except StopIteration:
                live.remove(i)
    assert texts == [solo[0].text, solo[1].text]
    assert [s.result.token_ids for s in streams] == [solo[0].token_ids, solo[1].token_ids]
    assert_idle(engine)


def test_add_request_outputs_still_come_from_step(engine, good, solo):
    rid = engine.add_request(good[0], PARAMS)
    [other] = engine.generate([good[1]], PARAMS)  # advances rid as well: its outputs wait for step()
    text, result = "", None
    while result is None:
        for out in engine.step():
            assert out.request_id == rid
            text += out.text
            result = out.result or result
    assert text == solo[0].text and result.token_ids == solo[0].token_ids
    assert other.token_ids == solo[1].token_ids
    assert_idle(engine)


def test_a_second_thread_gets_a_clear_error_and_the_engine_stays_usable(engine, good, solo, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    real = engine.runner.execute

    def slow(*args, **kwargs):
        inside.set()
        assert release.wait(30), "the test never released the first thread"
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", slow)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", engine.generate([good[0]], PARAMS)))
    first.start()
    try:
        assert inside.wait(30), "the first generate never reached the model"
        with pytest.raises(RuntimeError, match="another thread"):
            engine.generate([good[1]], PARAMS)
        with pytest.raises(RuntimeError, match="another thread"):
            engine.add_request(good[1], PARAMS)
    finally:
        release.set()
        first.join(60)
    monkeypatch.undo()
    assert not first.is_alive()
    assert results["first"][0].token_ids == solo[0].token_ids
    assert_idle(engine)
    assert_behaves(engine, good, solo)


def test_a_failed_stream_raises_and_leaves_nothing(engine, good, solo):
    stream = engine.stream(good[0], PARAMS)
    engine.model.lm_head.register_forward_hook(lambda m, a, o: torch.full_like(o, math.nan))
    try:
        with pytest.raises(RequestError, match="not finite"):
            list(stream)
    finally:
        engine.model.lm_head._forward_hooks.clear()
    assert stream.result is not None and stream.result.finish_reason == "error"
    assert_idle(engine)
    assert_behaves(engine, good, solo)


@pytest.mark.parametrize("field, value", [("block_size", 0), ("max_num_seqs", 0), ("num_kv_blocks", 0),
                                          ("max_model_len", -5), ("vision_cache_memory", -1), ("cuda_graphs", 1)])
def test_engine_config_is_checked_before_anything_is_allocated(field, value):
    from smolvlm.engine import EngineConfig

    with pytest.raises((TypeError, ValueError), match=f"EngineConfig.{field}"):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("section, field, value", [("text_config", "rms_norm_eps", math.nan),
                                                    ("text_config", "rms_norm_eps", -1.0),
                                                    ("text_config", "rope_theta", math.inf),
                                                    ("vision_config", "layer_norm_eps", 0.0)])
def test_config_floats_are_checked_on_load(tiny_ckpt, tmp_path, section, field, value):
    import json
    import shutil

    from smolvlm import ConfigError, SmolVLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[section][field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{section}.{field}"):
        SmolVLM.from_pretrained(ckpt)


def test_float16_on_cpu_runs_on_the_torch_attention_path(tiny_ckpt):
    engine = Engine.from_pretrained(tiny_ckpt, dtype=torch.float16, num_kv_blocks=64)  # cpu_kernels "auto"
    assert engine.backend.name == "torch"  # the C decode attention takes float32 / bfloat16 only
    [result] = engine.generate([user("Hi")], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert result.error is None and len(result.token_ids) == 4
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Engine.from_pretrained(tiny_ckpt, dtype=torch.float16, num_kv_blocks=64, attention_backend="cpu")


# ---------------------------------------------------------------------------------------------
# Media from URLs and files
# ---------------------------------------------------------------------------------------------


def _serve(handle_connection):
    """A TCP server on 127.0.0.1 whose every connection is handed to `handle_connection(socket)` in a
    thread; returns (port, stop)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stopping = threading.Event()

    def accept_loop():
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=handle_connection, args=(conn, stopping), daemon=True).start()
        listener.close()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()

    def stop():
        stopping.set()
        thread.join(5)

    return listener.getsockname()[1], stop


def _drip(conn, stopping):  # headers at once, then one byte every 0.2 s, for at most 60 s
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(300):
        if stopping.wait(0.2):
            break
        try:
            conn.sendall(b"x")
        except OSError:
            break
    conn.close()


def _silent(conn, stopping):  # accepts, never answers (at most 60 s)
    stopping.wait(60)
    conn.close()


@pytest.mark.parametrize("server", [_drip, _silent], ids=["drip-feed", "never-answers"])
def test_a_slow_url_fails_within_its_deadline(server, monkeypatch):
    from smolvlm.processing import ProcessorError
    from smolvlm.processing import image as image_module

    monkeypatch.setattr(image_module, "URL_TIMEOUT_S", 1.0)
    port, stop = _serve(server)
    outcome = {}

    def fetch():
        try:
            image_module.load_image({"type": "image", "url": f"http://127.0.0.1:{port}/x.png"})
        except ProcessorError as e:
            outcome["error"] = str(e)

    try:
        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(30)  # a liveness bound (the deadline is 1 s), not a speed claim
        assert not worker.is_alive(), "the download ignored its deadline"
    finally:
        stop()
    assert "cannot fetch" in outcome.get("error", ""), outcome


def test_url_never_reads_local_files_and_files_have_a_size_cap(tmp_path, photos, monkeypatch):
    from smolvlm.processing import ProcessorError
    from smolvlm.processing import image as image_module

    photo = tmp_path / "cat.png"
    photos["chelsea"].save(photo)
    with pytest.raises(ProcessorError, match="pass a local file as 'path'"):
        image_module.load_image({"type": "image", "url": str(photo)})
    with pytest.raises(ProcessorError, match="pass a local file as 'path'"):
        image_module.load_image({"type": "image", "url": f"file://{photo}"})
    assert image_module.load_image({"type": "image", "path": str(photo)}).size == photos["chelsea"].size
    monkeypatch.setattr(image_module, "FILE_MAX_BYTES", 1000)
    with pytest.raises(ProcessorError, match="byte limit"):
        image_module.load_image({"type": "image", "path": str(photo)})
