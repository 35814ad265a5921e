"""What a caller asks of one generation: `SamplingParams` (pure Python, no torch).

The sampling knobs mirror transformers' `GenerationConfig` names and semantics
(transformers/generation/configuration_utils.py, logits processors in generation/logits_process.py):
`temperature=0` means greedy (transformers: `do_sample=False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):  # a lone string is one stop string, not a tuple of characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop: empty stop strings are not allowed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
