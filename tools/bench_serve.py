"""`smolvlm serve` under load: requests/s, time to first token and inter-token latency at several
concurrencies, and the cost of HTTP over calling the engine directly.

    python tools/bench_serve.py                        # grafted 256M-shape checkpoint (tests' cache), fp32, CPU
    python tools/bench_serve.py --model DIR --requests 64 --concurrency 1,4,16 --max-tokens 64
    python tools/bench_serve.py --smoke                # seconds: tiny checkpoint (numbers meaningless)

What runs:
    server    `smolvlm serve` in a child process on 127.0.0.1 (an ephemeral port), fp32, the default
              engine settings (max_num_seqs 32, prefix caching on)
    clients   threads in this process, each streaming with httpx (`stream: true`, greedy,
              `max_tokens`), prompts all different ("Tell me about <topic>.", a shared system prompt)
    sweep     for each concurrency c: `--requests` requests, c in flight at a time; requests/s and
              generated tokens/s over the wall time of the whole batch; TTFT = request sent -> first
              content chunk; ITL = the gaps between content chunks (a chunk is one or more tokens of
              text); p50 and p99 over all requests
    overhead  one stream at a time, the same prompts alternately through the server and through
              `Engine.stream` on an engine loaded in this process (same checkpoint, same settings),
              `--rounds` times; per prompt the median of each, then the ratio of total times (the
              answers are equal, greedy, so both generate the same tokens). Target: <= 5 %.
Prints markdown tables and names the CPU; `--json PATH` writes every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ab import cpu_name  # noqa: E402 - a sibling script (standard library only at import)
TOPICS = ["the sea", "mountains", "a city at night", "bread", "rivers", "the moon", "winter", "trains", "music",
          "gardens", "the desert", "libraries", "rain", "bicycles", "forests", "the sun", "coffee", "bridges",
          "islands", "snow", "clocks", "birds", "markets", "ships", "lighthouses", "volcanoes", "tea", "castles",
          "the wind", "maps", "paper", "glass"]
SYSTEM = "You are a helpful assistant. Answer in a few sentences."


def messages(i: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" (part {i // len(TOPICS) + 1})")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {topic}."}]


def start_server(model: str, log_path: Path, context: int) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "smolvlm.cli", "serve", "--model", model, "--served-model-name", "bench",
                             "--port", "0", "--max-model-len", str(context), "--max-queue", "256"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = log_path.read_text()
        if " on http://" in text:
            url = "http://" + text.split(" on http://", 1)[1].split()[0]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")


def stream_once(client, url: str, i: int, max_tokens: int) -> dict:
    """One streamed request: its TTFT, inter-chunk gaps, total time, tokens and text."""
    body = {"model": "bench", "messages": messages(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, text, tokens = [], [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    times.append(time.perf_counter())
                    text.append(choice["delta"]["content"])
    done = time.perf_counter()
    return {"ttft": times[0] - sent if times else done - sent, "itl": [b - a for a, b in zip(times, times[1:])],
            "total": done - sent, "tokens": tokens, "text": "".join(text)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def sweep(url: str, concurrency: int, requests: int, max_tokens: int, offset: int) -> dict:
    import httpx

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        samples = list(pool.map(lambda i: stream_once(client, url, offset + i, max_tokens), range(requests)))
        wall = time.perf_counter() - start
    ttft = [s["ttft"] for s in samples]
    itl = [g for s in samples for g in s["itl"]]
    tokens = sum(s["tokens"] for s in samples)
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "tokens_per_s": tokens / wall, "tokens": tokens, "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99), "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
            "ttft": ttft, "itl_samples": len(itl)}


def direct_once(engine, i: int, max_tokens: int) -> dict:
    from smolvlm.engine import SamplingParams

    sent = time.perf_counter()
    times, text = [], []
    stream = engine.stream(messages(i), SamplingParams(max_new_tokens=max_tokens))
    for piece in stream:
        times.append(time.perf_counter())
        text.append(piece)
    done = time.perf_counter()
    return {"ttft": times[0] - sent if times else done - sent, "total": done - sent,
            "tokens": len(stream.result.token_ids), "text": "".join(text)}


def overhead(url: str, engine, prompts: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    rows = []
    with httpx.Client() as client:
        for i in range(prompts):
            server_runs, direct_runs = [], []
            for _ in range(rounds):  # interleaved: the machine's drift hits both sides alike
                direct_runs.append(direct_once(engine, 1000 + i, max_tokens))
                server_runs.append(stream_once(client, url, 1000 + i, max_tokens))
            if server_runs[0]["text"] != direct_runs[0]["text"]:
                raise SystemExit(f"prompt {i}: the server's answer differs from the engine's:\n"
                                 f"{server_runs[0]['text']!r}\n{direct_runs[0]['text']!r}")
            rows.append({"prompt": i, "tokens": direct_runs[0]["tokens"],
                         "direct_total": statistics.median(r["total"] for r in direct_runs),
                         "server_total": statistics.median(r["total"] for r in server_runs),
                         "direct_ttft": statistics.median(r["ttft"] for r in direct_runs),
                         "server_ttft": statistics.median(r["ttft"] for r in server_runs)})
    ratio = statistics.median(r["server_total"] / r["direct_total"] for r in rows)
    return {"rows": rows, "total_ratio": ratio,
            "direct_tokens_per_s": statistics.median(r["tokens"] / r["direct_total"] for r in rows),
            "server_tokens_per_s": statistics.median(r["tokens"] / r["server_total"] for r in rows),
            "direct_ttft": statistics.median(r["direct_ttft"] for r in rows),
            "server_ttft": statistics.median(r["server_ttft"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tests' grafted checkpoint)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length limit (default 48)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts in the overhead comparison (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each prompt per side (default 3)")
    parser.add_argument("--context", type=int, default=2048, help="--max-model-len of both engines (default 2048)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every sample here")
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, seconds (checks the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.max_tokens, args.prompts, args.rounds = 4, "1,2", 4, 2, 1
    model = args.model or str(REPO / ".cache" / "test-checkpoints" / ("tiny-v1" if args.smoke else "grafted-v1"))
    if not Path(model).is_dir():
        raise SystemExit(f"{model}: not a checkpoint directory (run the tests once to build it, or pass --model)")
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    from smolvlm.engine import Engine

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}.log"
    proc, url = start_server(model, log_path, args.context)
    try:
        engine = Engine.from_pretrained(model, dtype=torch.float32, max_model_len=args.context)
        stream_once(__import__("httpx").Client(), url, 999, 2)  # warm-up: first-step costs on both sides
        direct_once(engine, 999, 2)
        single = overhead(url, engine, args.prompts, args.rounds, args.max_tokens)
        del engine  # its memory and threads out of the way of the sweep
        results = []
        for n, c in enumerate(levels):
            results.append(sweep(url, c, args.requests, args.max_tokens, offset=2000 + 100 * n))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    if code != 0:
        raise SystemExit(f"the server exited {code}:\n{log_path.read_text()[-3000:]}")

    print(f"\nsmolvlm serve, {Path(model).name}, fp32, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"max_tokens {args.max_tokens}\n")
    print("| concurrency | requests | req/s | gen tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {1000 * r['itl_p50']:.1f} | {1000 * r['itl_p99']:.1f} |")
    print("\n| single stream | TTFT (s) | tok/s | total time |")
    print("|---|---|---|---|")
    print(f"| engine direct | {single['direct_ttft']:.3f} | {single['direct_tokens_per_s']:.1f} | 1.00x |")
    print(f"| server (HTTP + SSE) | {single['server_ttft']:.3f} | {single['server_tokens_per_s']:.1f} | "
          f"{single['total_ratio']:.3f}x |")
    print(f"\nserver overhead on one stream: {100 * (single['total_ratio'] - 1):+.1f} % (target <= 5 %)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "model": model, "max_tokens": args.max_tokens,
                                               "sweep": results, "single": single}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
