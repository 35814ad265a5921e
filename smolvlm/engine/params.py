"""What a caller asks of one generation: `SamplingParams` (pure Python, no torch).

The sampling knobs mirror transformers' `GenerationConfig` names and semantics
(transformers/generation/configuration_utils.py, logits processors in generation/logits_process.py):
`temperature=0` means greedy (transformers: `do_sample=False`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # 0 = off; keep the k most likely tokens
    top_p: float = 1.0  # 1 = off; keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style penalty on every token already in the sequence
    seed: int | None = None  # per-request generator: the same seed gives the same sample in any batch
    stop: tuple[str, ...] = ()  # stop strings: generation ends when the text contains one (it is cut off)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens, on top of the model's eos / <end_of_utterance>
    ignore_eos: bool = False  # keep going after eos (benchmarks)
    skip_special_tokens: bool = True  # for the detokenised `text`
    # None = off; k >= 0: each generated token's log-probability under the model (its raw logits,
    # before temperature, penalties and top-k/p, as vLLM and OpenAI report them) and the k most likely
    # alternatives, k <= MAX_LOGPROBS (OpenAI's `top_logprobs` limit)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Checked at the door, types and ranges, NaN and infinities rejected (`x <= 0` is False for
        # NaN, so a range test alone lets it through); every message names the field.
        _int("max_new_tokens", self.max_new_tokens, low=1)
        _real("temperature", self.temperature, low=0.0, low_open=False)
        _int("top_k", self.top_k, low=0)
        _real("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _real("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.seed is not None:
            _int("seed", self.seed, low=0, high=2**63 - 1)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # a lone string is one stop string
        try:
            stop = tuple(stop)
            stop_token_ids = tuple(self.stop_token_ids)
        except TypeError:
            raise TypeError("SamplingParams.stop and stop_token_ids must be sequences (of strings / of ints)") from None
        if any(not isinstance(t, str) or not t for t in stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {stop!r:.120}")
        for t in stop_token_ids:
            _int("stop_token_ids[...]", t, low=0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingParams.{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SamplingParams.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"SamplingParams.{name} must be {bounds}, got {value}")


def _real(name: str, value, low: float, low_open: bool, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SamplingParams.{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number, got {value}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise ValueError(f"SamplingParams.{name} must be in {interval}, got {value}")
