"""One thread owns the engine; the HTTP handlers (asyncio) hand it requests and get outputs back.

    loop = EngineLoop(engine); loop.start()     # its own thread (or loop.run(): this thread, until stop)
    handle = loop.submit(prompt, params)        # from the event loop: prompt already prepared
    async for output in handle: ...             # StepOutputs, the last one with the result
    loop.abort(handle)                          # the client went away: the request ends, its KV blocks free
    loop.stop()                                 # after the server has drained

An Engine serves one thread at a time (its `_exclusive` rule), so every engine call happens here:
`add_request`, `step` and `abort` of all clients, in one loop. Each step advances every running
request at once (continuous batching). Media are read and decoded before `submit`, by the handlers'
worker threads (`Engine.prepare` touches no engine state), so a slow download delays no one else.
After every step the loop publishes a `Snapshot` (running, waiting, KV blocks in use) that other
threads read without touching the engine.

`smolvlm serve` runs the loop in the main thread (`run`) and the HTTP server in another: the C
kernels and PyTorch parallelise over OpenMP, and libgomp stops spinning between parallel regions
once a process holds more OpenMP threads than CPUs; the main thread's team, made when the model
loaded, is then the only one (the media threads run PyTorch on one thread each, app.py). Measured on
2 cores: the same decode 10-20 % slower from a second thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from smolvlm.engine import Engine, SamplingParams
from smolvlm.engine.outputs import StepOutput
from smolvlm.engine.request import PromptInputs

from smolvlm.serve.protocol import BadRequest

log = logging.getLogger("smolvlm.serve")
# what a request gets when the loop has stopped (shutting down, or dead): a 503, as llama.cpp's server
def stopped() -> BadRequest:
    return BadRequest("the server is shutting down or its engine stopped; retry shortly", status=503,
                      type="server_error", code="unavailable", headers={"Retry-After": "1"})
IDLE_WAIT_S = 0.25  # how often an idle loop looks at the stop flag


@dataclass(frozen=True)
class Snapshot:
    running: int = 0
    waiting: int = 0  # admitted to the engine, not yet running
    kv_blocks_used: int = 0  # blocks referenced by running requests (cached free blocks not counted)
    kv_blocks_total: int = 0
    steps: int = 0


class Handle:
    """One request's outputs, for the event-loop side: `async for output in handle`."""

    def __init__(self, prompt: PromptInputs, params: SamplingParams, event_loop: asyncio.AbstractEventLoop):
        self.prompt = prompt
        self.params = params
        self.request_id: int | None = None  # set by the loop thread once the engine took it
        self.aborted = False
        self._event_loop = event_loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def _post(self, item: StepOutput | BaseException) -> None:
        """From the loop thread: hand one output (or the error that ended the request) over."""
        try:
            self._event_loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> "Handle":
        return self

    async def __anext__(self) -> StepOutput:
        if self._queue is None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue = None
            raise item
        if item.result is not None:
            self._queue = None  # the next call ends the iteration
        return item


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.snapshot = Snapshot(kv_blocks_total=engine.block_manager.num_blocks)
        self._inbox: queue.Queue = queue.Queue()  # ("add", Handle) / ("abort", Handle)
        self._handles: dict[int, Handle] = {}  # request id -> its handle, while it runs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # set by start(); run() uses the caller's thread
        self._running = False
        self.error: BaseException | None = None  # what killed the loop, if anything did
        # PyTorch's thread count is per thread, and a new thread starts from the last count any thread
        # set (the media threads set 1): the loop sets its own, that of the thread that made it.
        self.num_threads = torch.get_num_threads()

    def start(self) -> None:
        """Run the loop in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="smolvlm-engine-loop", daemon=True)
        self._running = True  # from now: requests submitted before the thread is scheduled are kept
        self._thread.start()

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Run the loop in the calling thread until `stop()` (or `keep_going()` turns False when idle)."""
        self._running = True
        torch.set_num_threads(self.num_threads)
        self._run(keep_going)

    def stop(self, timeout: float | None = None) -> None:
        """End the loop (what still runs is aborted); waits for the loop's own thread, if it has one."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running

    def submit(self, prompt: PromptInputs, params: SamplingParams) -> Handle:
        """Queue a prepared request; call from the event loop. Outputs (or a RequestError) arrive on the handle."""
        if not self.alive:
            raise stopped()
        handle = Handle(prompt, params, asyncio.get_running_loop())
        self._inbox.put(("add", handle))
        if not self.alive:  # it stopped meanwhile: whatever it did not take fails here, nothing waits forever
            self._fail_pending()
        return handle

    def abort(self, handle: Handle) -> None:
        """End a request early (any thread). Harmless if it already finished."""
        if not handle.aborted:
            handle.aborted = True
            self._inbox.put(("abort", handle))

    # ------------------------------------------------------------------ the loop thread

    def _run(self, keep_going: Callable[[], bool]) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                busy = engine.has_unfinished()
                self._drain_inbox(block=not busy)
                if not engine.has_unfinished():
                    if not keep_going():
                        break
                    continue
                try:
                    outputs = engine.step()
                except Exception as e:  # noqa: BLE001 - an engine bug: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all(RuntimeError(f"the engine failed: {type(e).__name__}: {e}"))
                    continue
                for output in outputs:
                    self._dispatch(output)
                self._publish()
        except BaseException as e:  # noqa: BLE001 - recorded for /health; the handlers see it as a dead loop
            self.error = e
            log.exception("the engine loop died")
        finally:
            self._running = False  # from here, submit() refuses, and fails what it put in too late
            self._fail_all(stopped())
            self._fail_pending()
            self._publish()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish()

    def _handle(self, kind: str, handle: Handle | None) -> None:
        if kind == "add" and not handle.aborted:
            prompt, handle.prompt = handle.prompt, None  # the engine holds the pixels from now on
            try:
                handle.request_id = self.engine.add_request(prompt, handle.params)
            except Exception as e:  # noqa: BLE001 - RequestError (over the context...): that request alone
                handle._post(e)
                return
            self._handles[handle.request_id] = handle
        elif kind == "abort" and handle.request_id is not None and handle.request_id in self._handles:
            del self._handles[handle.request_id]
            self.engine.abort(handle.request_id)

    def _dispatch(self, output: StepOutput) -> None:
        handle = self._handles.get(output.request_id)
        if handle is None:
            return
        if output.result is not None:
            del self._handles[output.request_id]
        handle._post(output)

    def _fail_pending(self) -> None:
        """Answer the requests still in the inbox: the loop will not take them."""
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                handle._post(stopped())

    def _fail_all(self, error: BaseException) -> None:
        for request_id, handle in list(self._handles.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - failing everything anyway
                pass
            handle._post(error)
        self._handles.clear()

    def _publish(self) -> None:
        engine = self.engine
        self.snapshot = Snapshot(
            running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting),
            kv_blocks_used=engine.block_manager.num_used_blocks,
            kv_blocks_total=engine.block_manager.num_blocks,
            steps=engine.stats.steps,
        )
