"""One request's state inside the engine (pure Python, no torch).

A `Sequence` is the unit the scheduler and block manager reason about: its tokens (prompt, then
generated), how many of them already have K/V in the cache (`num_computed_tokens`), its block table,
and the images whose placeholder tokens it holds. Images are opaque here (the runner knows their
tensors); only their content hashes and token positions matter, for prefix caching.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from dataclasses import dataclass
from typing import Any

from smolvlm.engine.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its K/V is gone and will be recomputed)
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"  # done (stop token, length, stop string) or failed


@dataclass(frozen=True)
class ImageSpan:
    """One image (or video) of a prompt: the positions of its `<image>` tokens, in order.

    `content_hash` identifies the pixels (every placeholder has the same token id, so the ids alone
    cannot tell two images apart). `image` is what the runner computes the features from (the
    engine's `ImageInput`); opaque here.
    """

    token_positions: tuple[int, ...]
    content_hash: str
    image: Any = None

    @property
    def start(self) -> int:  # the first <image> token
        return self.token_positions[0]

    @property
    def end(self) -> int:  # one past the last
        return self.token_positions[-1] + 1


def hash_block(parent: bytes | None, token_ids: list[int], image_keys: tuple[str, ...]) -> bytes:
    """The prefix-cache key of one full block: chained over all earlier blocks, so equal keys mean
    equal prefixes. `image_keys` names the image contents (and their spans) this block covers."""
    h = hashlib.sha256()
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    for key in image_keys:
        h.update(b"\x00img:" + key.encode())
    return h.digest()


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        images: list[ImageSpan] | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
    ):
        if not prompt_token_ids:
            raise ValueError(f"request {seq_id}: the prompt is empty")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.block_size = block_size
        self.images: list[ImageSpan] = sorted(images or [], key=lambda s: s.start)
        self.stop_token_ids = stop_token_ids
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache (last admission)
        self.num_committed_blocks = 0  # full blocks already registered in the prefix cache
        self.finish_reason: str | None = None  # "stop", "length", "error", "abort"
        self.error: str | None = None
        self._block_hashes: list[bytes] = []

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ------------------------------------------------------------------ prefix-cache keys

    def block_token_ids(self, index: int) -> list[int]:
        return self.token_ids[index * self.block_size : (index + 1) * self.block_size]

    def block_hash(self, index: int) -> bytes:
        """Key of full block `index` (tokens [index*bs, (index+1)*bs)); computed once, then memoised."""
        if (index + 1) * self.block_size > len(self.token_ids):
            raise ValueError(f"sequence {self.seq_id}: block {index} is not full")
        while len(self._block_hashes) <= index:
            i = len(self._block_hashes)
            start, end = i * self.block_size, (i + 1) * self.block_size
            image_keys = tuple(
                f"{span.content_hash}@{span.start}:{span.end}" for span in self.images if span.start < end and span.end > start
            )
            parent = self._block_hashes[-1] if i else None
            self._block_hashes.append(hash_block(parent, self.token_ids[start:end], image_keys))
        return self._block_hashes[index]
