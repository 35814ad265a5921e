"""An OpenAI-compatible HTTP server over one engine (`smolvlm serve`; needs the `serve` extra).

    smolvlm serve --model DIR --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "DIR", "messages": [{"role": "user", "content": "Hello"}]}'

Files, in the order a request meets them: app.py (routes, errors, streaming), protocol.py (the
request schema and response bodies), media.py (content parts -> the processor's items, local-file
rules), loop.py (the one thread that owns the engine), metrics.py (`/metrics`).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading


def serve(engine, config, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 60.0,
          log_level: str = "info") -> int:
    """Serve `engine` until SIGTERM or Ctrl-C. Both drain: new connections are refused and requests in
    flight (streams included) finish, for at most `drain_timeout` seconds (a second signal: at once).
    Returns the exit status: 0 after SIGTERM, 130 after Ctrl-C.

    The engine loop runs in this (the main) thread and the HTTP server (uvicorn) in another: see
    loop.py for why the engine wants the main thread."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError('smolvlm serve needs the serve extra: pip install "smolvlm[serve]"') from None
    from smolvlm.serve.app import create_app

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() runs the engine loop in the main thread and handles its signals; call it from there")
    app = create_app(engine, config, loop_thread=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so that --port 0 (any free port) can be reported
    sock.listen(2048)
    bound = sock.getsockname()[1]
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    http = uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=drain_timeout, lifespan="on", access_log=log_level == "debug",
    ))  # in a thread that is not the main one, uvicorn leaves the signals to us
    signals: list[int] = []

    def on_signal(signum, frame) -> None:
        if http.should_exit:  # a second signal: stop waiting for requests in flight
            http.force_exit = True
        http.should_exit = True  # uvicorn's graceful shutdown; its lifespan end stops the engine loop
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="smolvlm-http", daemon=True)
    print(f"smolvlm serve: {config.model_name} on http://{host}:{bound}", file=sys.stderr, flush=True)
    thread.start()
    try:
        # until the HTTP side has drained and shut down (its lifespan stops the loop), or has died
        app.state.server.loop.run(keep_going=thread.is_alive)
    finally:
        http.should_exit = True
        thread.join(drain_timeout + 10)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if app.state.server.loop.error is not None:
        print(f"smolvlm serve: the engine loop failed: {app.state.server.loop.error!r}", file=sys.stderr, flush=True)
        return 1
    print("smolvlm serve: stopped", file=sys.stderr, flush=True)
    return 130 if signals and signals[0] == signal.SIGINT else 0
