"""The HTTP application (Starlette): OpenAI's chat completions over one engine loop.

    app = create_app(engine, ServerConfig(model_name="smolvlm"))   # then: uvicorn.run(app, ...)

A request's path through this file: `chat_completions` reads the body (413 over the limit), checks
the key (401) and the schema (400, `protocol.parse_request`), the model name (404) and the queue
(503 + Retry-After); then, on a worker thread, turns the messages into a conversation
(`media.to_conversation`) and a prompt (`Engine.prepare`: media read, decoded, length checked: 400 on
any failure); the loop thread (`loop.EngineLoop`) runs it batched with every other request; the
answer goes back as one JSON body or as server-sent events (`EventStream`). A client that goes
away, at any point, has its request aborted and its KV blocks freed. Nothing a client sends can
raise past this file: what is not a 4xx is a logged 500 for that request alone.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from smolvlm.engine import Engine, SamplingParams
from smolvlm.engine.outputs import GenerationResult, TokenLogprob
from smolvlm.engine.request import PromptInputs
from smolvlm.processing.errors import ProcessorError
from smolvlm.serve import protocol
from smolvlm.serve.loop import EngineLoop, Handle
from smolvlm.serve.media import MediaFiles, to_conversation
from smolvlm.serve.metrics import Metrics
from smolvlm.serve.protocol import BadRequest, ChatCompletionRequest

log = logging.getLogger("smolvlm.serve")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_request_bytes: int = 100 * 1024 * 1024  # a body over this is a 413
    max_waiting: int = 64  # requests beyond the engine's max_num_seqs that may queue; more: 503
    media_threads: int = 4  # requests whose media are read and decoded at once
    max_media_per_request: int = 32  # images + videos in one request
    allowed_media_domains: tuple[str, ...] | None = None  # hosts http(s) media may come from; None: any

    def __post_init__(self) -> None:
        if self.allowed_local_media_path is not None:
            path = Path(self.allowed_local_media_path).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path}: not a directory")
            object.__setattr__(self, "allowed_local_media_path", path)
        for name in ("max_request_bytes", "media_threads", "max_media_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


def error_response(e: BadRequest) -> JSONResponse:
    return JSONResponse(protocol.error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


class Server:
    """The state of one app: the engine loop, the media threads, the counters."""

    def __init__(self, engine: Engine, config: ServerConfig, loop_thread: bool = True):
        if engine.processor is None:
            raise ValueError("the server needs an engine with a processor (Engine.from_pretrained)")
        self.engine = engine
        self.config = config
        self.loop = EngineLoop(engine)
        self.loop_thread = loop_thread  # False: the caller runs `self.loop.run()` (smolvlm.serve.serve)
        self.metrics = Metrics()
        # One PyTorch thread per media thread: no OpenMP team of their own, which would slow the
        # engine's (loop.py: libgomp stops spinning once OpenMP threads outnumber the CPUs).
        self.media = ThreadPoolExecutor(config.media_threads, thread_name_prefix="smolvlm-media",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self.text = ThreadPoolExecutor(2, thread_name_prefix="smolvlm-text", initializer=torch.set_num_threads,
                                       initargs=(1,))  # requests without media: template + tokenizer only
        self.created = protocol.now()  # for /v1/models
        self.capacity = engine.config.max_num_seqs + config.max_waiting
        self.active = 0  # admitted requests not yet answered (event loop only)
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)

    # ------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat_completions(request)
        except Exception:  # noqa: BLE001 - a bug: a 500 for this request alone, logged and counted
            log.exception("a chat completion failed")
            return self._count(error_response(BadRequest("internal server error", 500, "server_error")))

    async def _chat_completions(self, request: Request) -> Response:
        received = time.perf_counter()
        try:
            self._check_key(request)
            body = await self._read_json(request)
            chat = protocol.parse_request(body)
            if chat.model != self.config.model_name:
                raise BadRequest(f"the model {chat.model!r} does not exist; this server serves {self.config.model_name!r}",
                                 status=404, param="model", code="model_not_found")
            if self.active >= self.capacity or not self.loop.alive:
                raise BadRequest(f"the server is busy ({self.active} requests in flight); retry shortly", status=503,
                                 type="server_error", code="server_busy", headers={"Retry-After": "1"})
        except BadRequest as e:
            return self._count(error_response(e))
        except ClientDisconnect:
            return self._count(Response(status_code=499))
        self.active += 1
        streaming = False  # from the moment an EventStream exists, it gives the slot back
        try:
            try:
                prompt = await self._prepare(chat)
                params = self._params(chat, len(prompt.input_ids))
                if await request.is_disconnected():  # gone while its media were read: nothing to run
                    self.metrics.aborted += 1
                    return self._count(Response(status_code=499))
                handle = self.loop.submit(prompt, params)
            except BadRequest as e:
                return self._count(error_response(e))
            if chat.stream:
                self.metrics.responses[200] += 1
                streaming = True
                return EventStream(self, chat, handle, received)
            try:
                return self._count(await self._complete(request, chat, handle, received))
            finally:
                self.loop.abort(handle)  # a no-op when it finished; frees its blocks when the client left
        finally:
            if not streaming:
                self.active -= 1

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except BadRequest as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "smolvlm",
             "max_model_len": self.engine.max_model_len}]})

    async def health(self, request: Request) -> Response:
        if not self.loop.alive:
            return JSONResponse({"status": "error", "error": f"the engine loop stopped: {self.loop.error!r}"}, 503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.loop.snapshot), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ steps of a request

    def _count(self, response: Response) -> Response:
        self.metrics.responses[response.status_code] += 1
        return response

    def _check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise BadRequest("missing or wrong API key (send Authorization: Bearer KEY)", status=401,
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_json(self, request: Request):
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the request body is {declared} bytes, over the {limit}-byte limit", status=413,
                             code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the request body is over the {limit}-byte limit", status=413, code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest("the request body is not valid JSON: nested too deeply") from None

    async def _prepare(self, chat: ChatCompletionRequest) -> PromptInputs:
        """Messages -> PromptInputs on a media thread (files and URLs read, pixels decoded)."""
        has_media = any(not isinstance(m.content, str) and any(p.type != "text" for p in m.content)
                        for m in chat.messages)
        pool = self.media if has_media else self.text  # text never waits behind a slow download
        self.metrics.preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._prepare_sync, chat)
        finally:
            self.metrics.preparing -= 1

    def _prepare_sync(self, chat: ChatCompletionRequest) -> PromptInputs:
        files = MediaFiles()
        try:
            conversation = to_conversation(chat, self.config, files)
            return self.engine.prepare(conversation, trusted=False)
        except (ProcessorError, ValueError, OSError) as e:  # ValueError: RequestError, a bad path; OSError: a file
            message = _client_message(files.hide(str(e)))
            too_long = "the prompt is" in message and "tokens, longer than" in message
            raise BadRequest(message, param="messages", code="context_length_exceeded" if too_long else "invalid_media"
                             if _about_media(message) else None) from None
        finally:
            files.close()

    def _params(self, chat: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        room = self.engine.max_model_len - prompt_tokens
        asked = chat.max_completion_tokens or chat.max_tokens
        if asked is not None and asked > room:
            name = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
            raise BadRequest(
                f"this model's context is {self.engine.max_model_len} tokens: the prompt is {prompt_tokens} tokens and "
                f"{name} asks for {asked} more (at most {room})", param=name, code="context_length_exceeded")
        pool = self.engine.block_manager.num_blocks * self.engine.config.block_size
        if prompt_tokens + 1 > pool:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens and the server's KV cache holds {pool}: "
                             "it can never run here (use fewer or smaller images, or a shorter video)",
                             param="messages", code="context_length_exceeded")
        stop = [chat.stop] if isinstance(chat.stop, str) else (chat.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=asked or room,
                temperature=1.0 if chat.temperature is None else chat.temperature,  # OpenAI's default
                top_p=1.0 if chat.top_p is None else chat.top_p,
                top_k=0 if chat.top_k in (None, -1) else chat.top_k,
                repetition_penalty=1.0 if chat.repetition_penalty is None else chat.repetition_penalty,
                seed=None if chat.seed is None else chat.seed % 2**63,  # OpenAI's int64 seeds, negative too
                stop=tuple(stop),
                logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
            )
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e).removeprefix("SamplingParams.")) from None

    async def _complete(self, request: Request, chat: ChatCompletionRequest, handle: Handle, received: float) -> Response:
        """Wait for the whole answer, or for the client to leave (then the caller aborts it)."""
        disconnected = asyncio.ensure_future(_wait_disconnect(request.receive))
        first = True
        try:
            while True:
                next_output = asyncio.ensure_future(handle.__anext__())
                done, _ = await asyncio.wait({next_output, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if next_output not in done:
                    next_output.cancel()
                    self.metrics.aborted += 1
                    return Response(status_code=499)  # nobody reads it; counted as "client closed"
                try:
                    output = next_output.result()
                except Exception as e:  # noqa: BLE001 - RequestError from add_request, or the loop failing
                    raise_for(e)
                if first:
                    self.metrics.observe_ttft(time.perf_counter() - received)
                    first = False
                if output.result is not None:
                    return self._completion_response(chat, output.result)
        except BadRequest as e:
            return error_response(e)
        finally:
            disconnected.cancel()

    def _completion_response(self, chat: ChatCompletionRequest, result: GenerationResult) -> Response:
        if result.finish_reason == "error":
            return error_response(_result_error(result))
        self.metrics.finished(result.num_prompt_tokens, result.num_cached_tokens, len(result.token_ids))
        logprobs = self._logprobs(result.logprobs) if chat.logprobs else None
        body = protocol.completion(
            protocol.completion_id(), chat.model, protocol.now(), result.text, _finish_reason(result), logprobs,
            protocol.usage(result.num_prompt_tokens, len(result.token_ids), result.num_cached_tokens),
        )
        return JSONResponse(body)

    # ------------------------------------------------------------------ token texts for logprobs

    def _logprobs(self, entries: list[TokenLogprob] | None) -> list[dict]:
        out = []
        for entry in entries or []:
            token, raw = self.token_text(entry.token_id)
            out.append({"token": token, "logprob": entry.logprob, "bytes": raw, "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": b}
                for (t, b), lp in ((self.token_text(i), lp) for i, lp in entry.top)]})
        return out

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (for byte-level BPE: the token's own bytes, which may be part of a
        character, as OpenAI's `bytes` field means)."""
        tokenizer = self.engine.processor.tokenizer
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        piece = tokenizer.backend.id_to_token(token_id) or ""
        decoder = getattr(tokenizer.backend.decoder, "__class__", type(None)).__name__
        if decoder == "ByteLevel" and all(c in _BYTE_OF_CHAR for c in piece):
            return text, [_BYTE_OF_CHAR[c] for c in piece]
        return text, list(text.encode("utf-8"))

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        if self.loop_thread:
            self.loop.start()
        log.info("serving %s (context %d tokens, %d KV blocks)", self.config.model_name, self.engine.max_model_len,
                 self.engine.block_manager.num_blocks)
        try:
            yield
        finally:
            self.loop.stop(timeout=30)
            self.media.shutdown(wait=False, cancel_futures=True)
            self.text.shutdown(wait=False, cancel_futures=True)


class EventStream:
    """A streamed answer as server-sent events: an ASGI response of its own, so that whatever ends it
    (the answer, an error, the client leaving) runs its `finally`: the request aborted if unfinished,
    the admission slot given back."""

    def __init__(self, server: Server, chat: ChatCompletionRequest, handle: Handle, received: float):
        self.server = server
        self.chat = chat
        self.handle = handle
        self.received = received
        self.id = protocol.completion_id()
        self.created = protocol.now()
        self.with_usage = bool(chat.stream_options and chat.stream_options.include_usage)

    def _event(self, body: dict | str) -> bytes:
        data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def _chunk(self, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> bytes:
        return self._event(protocol.chunk(self.id, self.chat.model, self.created, delta, finish_reason, logprobs,
                                          self.with_usage))

    async def __call__(self, scope, receive, send) -> None:
        server, chat = self.server, self.chat
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            await send({"type": "http.response.body", "body": self._chunk({"role": "assistant", "content": ""}),
                        "more_body": True})
            first = True
            while True:
                next_output = asyncio.ensure_future(self.handle.__anext__())
                done, _ = await asyncio.wait({next_output, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if next_output not in done:
                    next_output.cancel()
                    server.metrics.aborted += 1
                    return  # the client left: `finally` aborts the request
                try:
                    output = next_output.result()
                except Exception as e:  # noqa: BLE001
                    await self._send_error(send, e)
                    return
                if first:
                    server.metrics.observe_ttft(time.perf_counter() - self.received)
                    first = False
                logprobs = server._logprobs(output.logprobs) if chat.logprobs and output.logprobs else None
                if output.text or logprobs:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": self._chunk({"content": output.text}, logprobs=logprobs)})
                result = output.result
                if result is None:
                    continue
                if result.finish_reason == "error":
                    await self._send_error(send, _result_error(result))
                    return
                server.metrics.finished(result.num_prompt_tokens, result.num_cached_tokens, len(result.token_ids))
                tail = self._chunk({}, _finish_reason(result))
                if self.with_usage:
                    tail += self._event(protocol.usage_chunk(self.id, chat.model, self.created, protocol.usage(
                        result.num_prompt_tokens, len(result.token_ids), result.num_cached_tokens)))
                await send({"type": "http.response.body", "body": tail + self._event("[DONE]"), "more_body": False})
                return
        except OSError:  # the connection broke while sending
            server.metrics.aborted += 1
            return
        finally:
            disconnected.cancel()
            server.loop.abort(self.handle)
            server.active -= 1

    async def _send_error(self, send, error: Exception) -> None:
        """An error after the 200 went out: one `data: {"error": ...}` event, then [DONE] (vLLM's way)."""
        if not isinstance(error, BadRequest):
            try:
                raise_for(error)
            except BadRequest as e:
                error = e
        body = self._event(protocol.error_body(error.message, error.type, error.param, error.code)) + self._event("[DONE]")
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _wait_disconnect(receive) -> None:
    """Returns when the client has gone (after the body has been read, `receive` waits for that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def raise_for(error: Exception) -> None:
    """An error from the engine loop as the BadRequest a client gets."""
    from smolvlm.engine.request import RequestError

    if isinstance(error, BadRequest):
        raise error
    if isinstance(error, RequestError):
        raise BadRequest(str(error), code="context_length_exceeded" if "context" in str(error) else None) from None
    raise BadRequest(f"internal error: {error}", status=500, type="server_error") from None


def _result_error(result: GenerationResult) -> BadRequest:
    message = result.error or "generation failed"
    client_side = "no token could be sampled" in message or "KV-cache blocks" in message
    return BadRequest(message, status=400 if client_side else 500,
                      type="invalid_request_error" if client_side else "server_error")


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _client_message(message: str) -> str:
    """A processor message in this API's terms: no conversation index (there is one), no hint that
    names Python options a client cannot set."""
    message = message.removeprefix("conversation 0: ")
    return message.replace("(use fewer or smaller images: do_image_splitting=False, image_longest_edge, video_max_frames)",
                           "(use fewer or smaller images, or a shorter video)")


def _about_media(message: str) -> bool:
    return any(word in message for word in ("image", "video", "URL", "url", "fetch", "base64", "cannot open"))


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()


def create_app(engine: Engine, config: ServerConfig, loop_thread: bool = True) -> Starlette:
    """The ASGI app for `engine` (which it owns from now on: one loop thread calls it). `loop_thread`:
    the app starts that thread itself; False: the caller runs `app.state.server.loop.run()`."""
    server = Server(engine, config, loop_thread)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(protocol.error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code)

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(protocol.error_body("internal server error", "server_error"), status_code=500)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: not_found, Exception: internal},
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app
