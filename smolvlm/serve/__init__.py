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


def serve(engine, config, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 60.0,
          log_level: str = "info") -> int:
    """Serve `engine` until SIGTERM or Ctrl-C; both drain: new connections are refused, requests in
    flight (streams included) finish, for at most `drain_timeout` seconds, then the process exits 0."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError('smolvlm serve needs the serve extra: pip install "smolvlm[serve]"') from None
    from smolvlm.serve.app import create_app

    app = create_app(engine, config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so that --port 0 (any free port) can be reported
    sock.listen(2048)
    bound = sock.getsockname()[1]
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=drain_timeout, lifespan="on", access_log=log_level == "debug",
    ))
    print(f"smolvlm serve: {config.model_name} on http://{host}:{bound}", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again for the previous handler: this one makes
    # that a clean exit (status 0) rather than death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    print("smolvlm serve: stopped", file=sys.stderr, flush=True)
    return 0
