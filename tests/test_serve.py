"""`smolvlm serve`: the real server in a subprocess on 127.0.0.1 (an ephemeral port), spoken to with
the official `openai` client (and httpx where a test needs the raw HTTP: bad JSON, disconnects).

The reference for every answer is `Engine.generate` on the same conversation, alone (greedy, tiny
checkpoint): the server must give exactly that text, streamed or not, however many clients share
the engine. KV blocks are checked through `/metrics` (`smolvlm_kv_cache_blocks_used` is 0 once
nothing runs)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from smolvlm.engine import Engine, SamplingParams
from smolvlm.serve.metrics import parse as parse_metrics

KEY = "test-key"
MODEL = "tiny"
CONTEXT = 2048
MAX_TOKENS = 12


class ServerProcess:
    def __init__(self, ckpt: Path, workdir: Path, *flags: str):
        self.log = workdir / f"server-{time.monotonic_ns()}.log"
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(ckpt), "--served-model-name", MODEL,
             "--host", "127.0.0.1", "--port", "0", "--max-model-len", str(CONTEXT), "--kv-cache-gb", "0.05", *flags],
            stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 120
        self.url = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log.read_text()
            if " on http://" in text and self.url is None:
                self.url = text.split(" on http://", 1)[1].split()[0]
                self.url = f"http://{self.url}"
            if self.url:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        """/metrics once nothing runs or waits (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["smolvlm_requests_running"] == 0 and m["smolvlm_requests_waiting"] == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos, short_video):
    """The files, under one folder (the server's --allowed-local-media-path)."""
    folder = tmp_path_factory.mktemp("served-media")
    paths = {}
    for name in ("small", "chelsea"):
        paths[name] = folder / f"{name}.png"
        photos[name].save(paths[name])
    paths["video"] = folder / "short.mp4"
    paths["video"].write_bytes(short_video.read_bytes())
    return folder, paths


@pytest.fixture(scope="module")
def server(tiny_ckpt, media, tmp_path_factory):
    s = ServerProcess(tiny_ckpt, tmp_path_factory.mktemp("server"), "--api-key", KEY,
                      "--allowed-local-media-path", str(media[0]), "--max-request-bytes", "2000000")
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, max_model_len=CONTEXT)


def cases(paths) -> dict[str, tuple[list, list]]:
    """name -> (OpenAI messages for the server, the same conversation for Engine.generate)."""
    small, chelsea, video = paths["small"], paths["chelsea"], paths["video"]
    q = "What is in this picture?"
    return {
        "text": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]),
        "image": ([{"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": data_url(small.read_bytes(), "image/png")}},
                      {"type": "text", "text": q}]}],
                  [{"role": "user", "content": [{"type": "image", "path": str(small)}, {"type": "text", "text": q}]}]),
        "two images": ([{"role": "user", "content": [
                           {"type": "text", "text": "Compare"},
                           {"type": "image_url", "image_url": {"url": data_url(small.read_bytes(), "image/png")}},
                           {"type": "image_url", "image_url": {"url": data_url(chelsea.read_bytes(), "image/png")}}]}],
                       [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "path": str(small)},
                                                     {"type": "image", "path": str(chelsea)}]}]),
        "video": ([{"role": "user", "content": [
                      {"type": "video_url", "video_url": {"url": data_url(video.read_bytes(), "video/mp4")}},
                      {"type": "text", "text": "Describe the video."}]}],
                  [{"role": "user", "content": [{"type": "video", "path": str(video)},
                                                {"type": "text", "text": "Describe the video."}]}]),
    }


@pytest.fixture(scope="module")
def solo(engine, media):
    """name -> Engine.generate's result for that conversation alone (greedy, MAX_TOKENS)."""
    out = {}
    for name, (_, conversation) in cases(media[1]).items():
        (result,) = engine.generate([conversation], SamplingParams(max_new_tokens=MAX_TOKENS))
        assert result.finish_reason in ("stop", "length"), result.error
        out[name] = result
    return out


def ask(client, messages, stream: bool, **kwargs) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of one chat completion, the stream's deltas joined."""
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answers_equal_the_engine(server, media, solo, stream):
    client = server.client()
    for name, (messages, _) in cases(media[1]).items():
        text, finish, usage = ask(client, messages, stream)
        want = solo[name]
        assert text == want.text, f"{name}: server {text!r} != engine {want.text!r}"
        assert finish == want.finish_reason, name
        assert (usage.prompt_tokens, usage.completion_tokens) == (want.num_prompt_tokens, len(want.token_ids)), name
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_prefix_cache_is_reported_in_usage(server, media, solo):
    messages = cases(media[1])["two images"][0]
    client = server.client()
    ask(client, messages, False)
    _, _, usage = ask(client, messages, False)
    cached = usage.prompt_tokens_details.cached_tokens
    # the whole prompt but its last block (the last token always runs): a multiple of the block size
    assert 0 < cached < usage.prompt_tokens and cached % 16 == 0, cached


def test_logprobs_match_the_model(server, media, engine):
    """Each token's logprob and its top 3 equal log_softmax of a plain forward pass over prompt + answer."""
    messages = [{"role": "user", "content": "Count to five."}]
    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3)
    (result,) = engine.generate([messages], SamplingParams(max_new_tokens=6))
    prompt = engine.prepare(messages).input_ids
    ids = torch.tensor([prompt + result.token_ids])
    with torch.inference_mode():
        logp = engine.model(ids)[0].float().log_softmax(-1)  # (T, vocab)
    content = r.choices[0].logprobs.content
    assert len(content) == len(result.token_ids)
    decode = engine.processor.tokenizer.decode
    for k, (entry, token) in enumerate(zip(content, result.token_ids)):
        row = logp[len(prompt) - 1 + k]
        assert entry.token == decode([token]), k
        assert abs(entry.logprob - float(row[token])) < 1e-4, (k, entry.logprob, float(row[token]))
        top_values, top_ids = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [decode([int(i)]) for i in top_ids], k
        diff = max(abs(t.logprob - float(v)) for t, v in zip(entry.top_logprobs, top_values))
        assert diff < 1e-4, f"token {k}: top logprobs differ by {diff}"
        if "\ufffd" not in entry.token:  # a whole character: its bytes are its UTF-8
            assert bytes(entry.bytes) == entry.token.encode(), k
    # streamed: the same entries, spread over the chunks
    streamed = []
    for chunk in server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                         logprobs=True, top_logprobs=3, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_parameters(server, solo, media):
    """max_completion_tokens, stop, null fields (OpenAI marks them nullable), no usage chunk unless asked."""
    client = server.client()
    messages = cases(media[1])["text"][0]
    want = solo["text"]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert want.text.startswith(r.choices[0].message.content)
    cut = want.text[len(want.text) // 2:][:3]  # a stop string from the middle of the answer
    if cut.strip():
        text, finish, _ = ask(client, messages, False, stop=[cut])
        assert text == want.text[: want.text.index(cut)] and finish == "stop"
    nulls = post(server, {"messages": messages, "max_tokens": MAX_TOKENS, "stream": None, "n": None, "logprobs": None,
                          "stop": None, "seed": -5})
    assert nulls.status_code == 200 and nulls.json()["choices"][0]["message"]["content"] == want.text
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    messages = [{"role": "user", "content": "Say something."}]
    sampled = dict(temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 50, "repetition_penalty": 1.1})
    first = ask(client, messages, False, **sampled)[0]
    assert ask(client, messages, True, **sampled)[0] == first
    assert ask(client, messages, False)[0] != first  # greedy differs: the settings were used


def corrupt_png() -> str:
    return data_url(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "image/png")


def bad_requests(paths) -> list[tuple[str, dict | bytes, int, str]]:
    """(name, request body (a dict, or raw bytes), expected status, a phrase of the message)."""
    user = lambda content: [{"role": "user", "content": content}]  # noqa: E731
    return [
        ("corrupt image", {"messages": user([{"type": "image_url", "image_url": {"url": corrupt_png()}},
                                             {"type": "text", "text": "hi"}])}, 400, "image"),
        ("over the context", {"messages": user("word " * 2100)}, 400, "the prompt is"),
        ("answer over the context", {"messages": user("hi"), "max_tokens": CONTEXT}, 400, "asks for"),
        ("wrong type", {"messages": user("hi"), "temperature": "hot"}, 400, "temperature"),
        ("content type", {"messages": user([{"type": "input_audio", "input_audio": {}}])}, 400, "input_audio"),
        ("unknown model", {"model": "gpt-4o", "messages": user("hi")}, 404, "gpt-4o"),
        ("n > 1", {"messages": user("hi"), "n": 2}, 400, "n must be 1"),
        ("tools", {"messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
        ("role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        ("no messages", {"messages": []}, 400, "messages"),
        ("outside the media folder", {"messages": user([{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}])},
         400, "outside"),
        ("missing local file", {"messages": user([{"type": "image_url", "image_url": {"url": "file://" + str(paths["small"].parent / "none.png")}}])},
         400, "cannot open"),
        ("corrupt video", {"messages": user([{"type": "video_url", "video_url": {"url": data_url(b"not a video" * 10, "video/mp4")}}])},
         400, "video"),
        ("bad sampling", {"messages": user("hi"), "top_p": 0}, 400, "top_p"),
        ("huge integer", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
         + b"9" * 5000 + b"}", 400, "not valid JSON"),
        ("NUL in a path", {"messages": user([{"type": "image_url", "image_url": {"url": "a\x00b.png"}}])}, 400,
         "not a valid file path"),
        ("surrogate in a path", {"messages": user([{"type": "image_url", "image_url": {"url": "file:///x%ED%A0%80.png"}}])},
         400, "image_url.url"),
        ("too many images", {"messages": user([{"type": "image_url", "image_url": {"url": corrupt_png()}}] * 33)}, 400,
         "limit of 32"),
        ("unknown scheme", {"messages": user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])}, 400,
         "scheme"),
    ]


def post(server, body, key: str | None = KEY, timeout=60, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        body = {"model": MODEL, "max_tokens": 4, "temperature": 0, **body}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout, **kwargs)
    return httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=timeout, **kwargs)


def check_error(response: httpx.Response, status: int, phrase: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert phrase in error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")


BAD_NAMES = [name for name, *_ in bad_requests({"small": Path("/media/small.png")})]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_requests_get_their_4xx(server, media, name):
    _, body, status, phrase = next(b for b in bad_requests(media[1]) if b[0] == name)
    check_error(post(server, body), status, phrase)


def test_http_level_errors(server):
    check_error(post(server, b"{not json"), 400, "not valid JSON")
    check_error(post(server, b"[1, 2]"), 400, "JSON object")
    check_error(post(server, b"\xff\xfe"), 400, "not valid JSON")
    check_error(post(server, {"messages": [{"role": "user", "content": "hi"}]}, key=None), 401, "API key")
    check_error(post(server, {"messages": [{"role": "user", "content": "hi"}]}, key="wrong"), 401, "API key")
    check_error(post(server, {"messages": [{"role": "user", "content": "x" * 2_100_000}]}), 413, "limit")
    chunked = (b"x" * 100_000 for _ in range(30))  # no Content-Length: counted while reading
    check_error(post(server, chunked), 413, "limit")
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="prompt is"):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 2100}])
    r = httpx.get(f"{server.url}/v1/unknown")
    assert r.status_code == 404 and "error" in r.json()
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_local_files_under_the_allowed_folder(server, media, solo):
    folder, paths = media
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": paths["small"].as_uri()}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    assert ask(server.client(), messages, False)[0] == solo["image"].text
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "short.mp4"}},  # relative to the folder
                                          {"type": "text", "text": "Describe the video."}]}]
    assert ask(server.client(), video, True)[0] == solo["video"].text
    link = folder / "escape.png"
    if not link.exists():
        link.symlink_to("/etc/hostname")
    check_error(post(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(link)}}]}]}), 400, "outside")
    check_error(post(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(folder / ".." / "x.png")}}]}]}), 400, "outside")


def test_concurrent_streams_with_bad_requests(server, media, solo):
    """16 streams (4 conversations x 4) and 14 bad requests at once: each good answer equals its solo
    answer, each bad one gets its 4xx, and afterwards no KV block is held."""
    good = list(cases(media[1]).items()) * 4
    bad = bad_requests(media[1])
    client = server.client()

    def run_good(item):
        name, (messages, _) = item
        return name, ask(client, messages, True)

    def run_bad(item):
        name, body, status, phrase = item
        return name, post(server, body), status, phrase

    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        bad_futures = [pool.submit(run_bad, b) for b in bad]
        good_futures = [pool.submit(run_good, g) for g in good]
        for future in good_futures:
            name, (text, finish, _) = future.result()
            assert text == solo[name].text, f"{name}: {text!r} != {solo[name].text!r}"
            assert finish == solo[name].finish_reason
        for future in bad_futures:
            name, response, status, phrase = future.result()
            check_error(response, status, phrase)
    m = server.wait_idle()
    assert m["smolvlm_kv_cache_blocks_used"] == 0


def test_disconnect_frees_blocks(server, engine):
    """A stream the client drops after 4 chunks is aborted at once: the engine stops stepping it (its
    steps stay far below its max_tokens) and its blocks are free."""
    messages = [{"role": "user", "content": "Write a long essay."}]
    room = CONTEXT - len(engine.prepare(messages).input_ids)
    before = server.metrics()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": room, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
        chunks = 0
        for line in lines:
            chunks += line.startswith("data: {")
            if chunks == 4:
                break
        held = server.metrics()
        assert held["smolvlm_kv_cache_blocks_used"] > 0 and held["smolvlm_requests_running"] == 1
    after = server.wait_idle()
    assert after["smolvlm_kv_cache_blocks_used"] == 0
    assert after["smolvlm_requests_aborted_total"] == before["smolvlm_requests_aborted_total"] + 1
    steps = after["smolvlm_engine_steps_total"] - before["smolvlm_engine_steps_total"]
    assert steps < room // 4, f"{steps} steps: the request kept running after its client left"


def test_disconnect_of_a_whole_answer_request(server, engine):
    """The same for a non-streamed request: the client gives up (read timeout), the request is aborted."""
    messages = [{"role": "user", "content": "Write another long essay."}]
    room = CONTEXT - len(engine.prepare(messages).input_ids)
    before = server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        post(server, {"messages": messages, "max_tokens": room}, timeout=httpx.Timeout(60, read=0.5))
    after = server.wait_idle()
    assert after["smolvlm_kv_cache_blocks_used"] == 0
    assert after["smolvlm_requests_aborted_total"] == before["smolvlm_requests_aborted_total"] + 1
    steps = after["smolvlm_engine_steps_total"] - before["smolvlm_engine_steps_total"]
    assert steps < room // 4, f"{steps} steps: the request kept running after its client left"


def test_bounded_load(server):
    """200 requests, 16 at a time (a quarter streamed), stopping by itself: no 5xx, no leaked block."""
    client = server.client()
    before = server.metrics()

    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Request number {i}."}]
        return ask(client, messages, stream=i % 4 == 0, max_tokens=3)[1]

    with ThreadPoolExecutor(16) as pool:
        finishes = list(pool.map(one, range(200)))
    assert all(f in ("stop", "length") for f in finishes)
    m = server.wait_idle()
    assert m["smolvlm_kv_cache_blocks_used"] == 0
    assert m['smolvlm_requests_total{status="200"}'] - before['smolvlm_requests_total{status="200"}'] == 200
    assert not any(k.startswith('smolvlm_requests_total{status="5') for k in m), m
    assert m["smolvlm_time_to_first_token_seconds_count"] >= 200


def test_busy_server_and_sigterm_drain(tiny_ckpt, tmp_path, engine):
    """One running request and no queue: a second request gets 503 + Retry-After. SIGTERM during the
    stream: the stream goes on to its full answer and [DONE], and the process exits 0."""
    s = ServerProcess(tiny_ckpt, tmp_path, "--max-num-seqs", "1", "--max-queue", "0", "--drain-timeout", "300")
    try:
        messages = [{"role": "user", "content": "Write a long essay."}]
        (want,) = engine.generate([messages], SamplingParams(max_new_tokens=400))
        events: list[str] = []
        started = threading.Event()

        def read_stream():
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", timeout=120, json={
                    "model": MODEL, "messages": messages, "max_tokens": 400, "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(60)
        busy = httpx.post(f"{s.url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        assert busy.json()["error"]["code"] == "server_busy"
        at_signal = len(events)
        s.proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert s.proc.wait(60) == 0, s.log.read_text()[-2000:]
    finally:
        s.stop()
    assert events[-1] == "[DONE]"
    assert len(events) > at_signal + 10, "the stream should still have been running at SIGTERM"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason


def test_engine_logprobs_per_request(engine):
    """Engine level: only the requests that ask get logprobs; greedy picks the top-1; the limit is checked."""
    conversations = [[{"role": "user", "content": "One."}], [{"role": "user", "content": "Two, three."}]]
    with_lp, without = engine.generate(conversations, [SamplingParams(max_new_tokens=5, logprobs=2),
                                                       SamplingParams(max_new_tokens=5)])
    assert without.logprobs is None
    assert [e.token_id for e in with_lp.logprobs] == with_lp.token_ids
    for entry in with_lp.logprobs:
        assert len(entry.top) == 2 and entry.top[0][0] == entry.token_id and entry.top[0][1] == entry.logprob
        assert entry.top[0][1] >= entry.top[1][1] and entry.logprob <= 0
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(TypeError, match="logprobs"):
        SamplingParams(logprobs=True)


@pytest.fixture(scope="module")
def media_site(media):
    """A plain HTTP server on 127.0.0.1 serving the media folder (stopped at the end of the module)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media[0]))
    handler.log_message = lambda *args: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


def test_media_by_http_url(server, media_site, solo):
    """image_url and video_url over http: fetched by the server (same answers); a 404 is a 400 naming the URL."""
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{media_site}/small.png"}},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    assert ask(server.client(), image, False)[0] == solo["image"].text
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{media_site}/short.mp4"}},
                                          {"type": "text", "text": "Describe the video."}]}]
    assert ask(server.client(), video, True)[0] == solo["video"].text
    missing = f"{media_site}/missing.png"
    check_error(post(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": missing}}]}]}), 400, missing)


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--allowed-local-media-path", "/nonexistent-dir"], "not a directory"),
])
def test_bad_serve_flags_fail_before_the_model_loads(tiny_ckpt, flags, message):
    result = subprocess.run([sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(tiny_ckpt), *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
