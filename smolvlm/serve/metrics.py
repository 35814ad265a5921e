"""`GET /metrics`: Prometheus text exposition format, written by hand (a dozen series do not need
prometheus_client, and its default registry is process-global state; this one belongs to one app).

Series (names after vLLM's `vllm:*` ones where they exist, prefixed `smolvlm_`):
    smolvlm_requests_total{status}            HTTP responses of /v1/chat/completions by status code
    smolvlm_requests_aborted_total            requests whose client left before the end (aborted, blocks freed)
    smolvlm_prompt_tokens_total               prompt tokens of finished requests
    smolvlm_cached_prompt_tokens_total        of those, served from the prefix cache
    smolvlm_generation_tokens_total           generated tokens
    smolvlm_time_to_first_token_seconds       histogram: request received -> first output token
    smolvlm_requests_running / _waiting       in the engine now (waiting: queued there, or reading media)
    smolvlm_kv_cache_blocks_used / _total     KV-cache blocks held by requests / in the pool
    smolvlm_kv_cache_usage_ratio              used / total
    smolvlm_engine_steps_total                model steps the engine has run
"""

from __future__ import annotations

import bisect
from collections import Counter

from smolvlm.serve.loop import Snapshot

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)


class Metrics:
    """Counters of one server; updated from the event loop only (no lock needed)."""

    def __init__(self) -> None:
        self.responses: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # the last one: above every bucket
        self.ttft_sum = 0.0
        self.preparing = 0  # requests whose media are being read (not yet in the engine)
        self.aborted = 0  # requests whose client left before the answer was complete

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def finished(self, prompt_tokens: int, cached_tokens: int, generated: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.cached_prompt_tokens += cached_tokens
        self.generation_tokens += generated

    def render(self, snapshot: Snapshot) -> str:
        lines: list[str] = []

        def series(name: str, kind: str, help: str, values: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in values)

        series("smolvlm_requests_total", "counter", "Chat-completion responses by HTTP status.",
               [(f'{{status="{code}"}}', n) for code, n in sorted(self.responses.items())] or [('{status="200"}', 0)])
        series("smolvlm_requests_aborted_total", "counter", "Requests ended early because the client went away.",
               [("", self.aborted)])
        series("smolvlm_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)])
        series("smolvlm_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [("", self.cached_prompt_tokens)])
        series("smolvlm_generation_tokens_total", "counter", "Generated tokens.", [("", self.generation_tokens)])
        cumulative, buckets = 0, []
        for bound, count in zip(TTFT_BUCKETS, self.ttft_counts):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound:g}"}}', cumulative))
        total = cumulative + self.ttft_counts[-1]
        buckets += [('_bucket{le="+Inf"}', total), ("_sum", self.ttft_sum), ("_count", total)]
        lines.append("# HELP smolvlm_time_to_first_token_seconds Request received to first output token.")
        lines.append("# TYPE smolvlm_time_to_first_token_seconds histogram")
        lines.extend(f"smolvlm_time_to_first_token_seconds{suffix} {_number(v)}" for suffix, v in buckets)
        series("smolvlm_requests_running", "gauge", "Requests the engine is running.", [("", snapshot.running)])
        series("smolvlm_requests_waiting", "gauge", "Requests queued in the engine or reading their media.",
               [("", snapshot.waiting + self.preparing)])
        series("smolvlm_kv_cache_blocks_used", "gauge", "KV-cache blocks held by requests.", [("", snapshot.kv_blocks_used)])
        series("smolvlm_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", [("", snapshot.kv_blocks_total)])
        ratio = snapshot.kv_blocks_used / snapshot.kv_blocks_total if snapshot.kv_blocks_total else 0.0
        series("smolvlm_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache pool in use.", [("", ratio)])
        series("smolvlm_engine_steps_total", "counter", "Model steps the engine has run.", [("", snapshot.steps)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (for tests and tools/bench_serve.py)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
