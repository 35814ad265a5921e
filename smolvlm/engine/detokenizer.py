"""Incremental detokenisation: text pieces as tokens arrive, never a broken UTF-8 character.

Byte-level BPE splits a multi-byte character (an emoji, an accented letter) over several tokens;
decoding a prefix then ends in U+FFFD. Like vLLM's detokenizer, we decode a short window twice (the
tokens already emitted and the window plus the new ones) and emit only the difference, and only
once it does not end in U+FFFD. `finish()` flushes whatever is held back at the end.
The concatenated pieces equal `decode(all tokens)`.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode  # token ids -> text (special tokens already handled by the callable)
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start: context for decoding (leading spaces, merges)
        self.read_offset = 0  # tokens before this have been emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes ('' if it ends mid-character)."""
        self.token_ids.append(token_id)
        emitted = self.decode(self.token_ids[self.prefix_offset : self.read_offset])
        current = self.decode(self.token_ids[self.prefix_offset :])
        if len(current) <= len(emitted) or current.endswith(REPLACEMENT):
            return ""
        piece = current[len(emitted) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """The rest of the text (an unfinished character comes out as U+FFFD), so that the pieces add up to decode(all)."""
        full = self.decode(self.token_ids)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        return piece
