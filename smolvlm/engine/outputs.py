"""What the engine hands out: per-step text, final results, and the text handling between the two.

`TextOutput` turns one request's tokens into the text a user may see: detokenised without splitting a
character (detokenizer.py), cut before the first stop string, and holding back the tail that could
still turn out to be the start of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from smolvlm.engine.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position
    (`SamplingParams.logprobs`), from the model's raw logits."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class GenerationResult:
    request_id: int
    text: str
    token_ids: list[int]  # generated tokens, the stop token included when there was one
    finish_reason: str  # "stop" (stop token or string), "length", "error", "abort"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (at the last admission)
    time_to_first_token: float | None = None  # seconds from add_request to the first sampled token
    total_time: float | None = None  # seconds from add_request to the end
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when SamplingParams.logprobs is set


@dataclass
class StepOutput:
    request_id: int
    text: str  # new text since the last step ('' when a token completes no character yet)
    result: GenerationResult | None = None  # set when the request finished this step
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated since the last output


class TextOutput:
    """One request's answer text, token by token."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stop = tuple(stop)
        self.holdback = max(len(s) for s in stop) - 1 if stop else 0  # a stop string may start in these
        self.emitted = 0  # characters already handed out
        self.stop_at: int | None = None  # where the first stop string starts, once one appeared

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when the text now holds a stop string (the answer ends
        before it)."""
        piece = self.detokenizer.add(token_id)
        if self.stop and piece:
            text = self.detokenizer.text
            search_from = max(0, len(text) - len(piece) - self.holdback)  # a match must touch the new piece
            found = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if found:
                self.stop_at = min(found)
                return True
        return False

    def new_text(self) -> str:
        """The text not handed out yet that can no longer be cut by a stop string."""
        visible = len(self.detokenizer.text) - self.holdback
        if visible <= self.emitted:
            return ""
        out = self.detokenizer.text[self.emitted : visible]
        self.emitted = visible
        return out

    def finish(self) -> tuple[str, str]:
        """At the end: (the whole answer, the part of it not handed out yet)."""
        if self.stop_at is not None:
            text = self.detokenizer.text[: self.stop_at]
        else:
            self.detokenizer.finish()  # flush a held-back partial character
            text = self.detokenizer.text
        rest = text[self.emitted :]
        self.emitted = len(text)
        return text, rest
