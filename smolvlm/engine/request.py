"""What a request is made of before it runs: a tokenised prompt and its images, checked once.

    prompt = prompt_from_conversation(processor, messages)   # the processor's output, as engine inputs
    spans = image_spans(prompt, request_id, vocab_size, image_token_id, image_seq_len)  # checked; where each image's tokens are

`ImageInput` is the engine's one record of an image (or a video): its tiles, their content hash, an
optional pixel mask. A `Sequence` keeps each with the prompt positions of its `<image>` tokens
(`sequence.ImageSpan`); the runner computes its features from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from smolvlm.engine.sequence import ImageSpan

Messages = list[dict[str, Any]]


class RequestError(ValueError):
    """A request that cannot be served (bad input, too long, failed during generation)."""


@dataclass
class ImageInput:
    """One image (its tiles) or one video (its frames), as the model sees them."""

    pixel_values: torch.Tensor  # (n_tiles, 3, H, W) float, normalised
    content_hash: str  # identifies the pixels: equal hashes must mean equal tiles
    pixel_attention_mask: torch.Tensor | None = None  # (n_tiles, H, W) or None (every pixel real)


@dataclass
class PromptInputs:
    """A tokenised prompt: ids with `<image>` placeholders, and the images that fill them, in order."""

    input_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)


def prompt_from_conversation(processor, conversation: Messages, **processor_options: Any) -> PromptInputs:
    """Conversation -> PromptInputs through the processor (raises its ProcessorError on bad input)."""
    if processor is None:
        raise RequestError("this engine has no processor: pass PromptInputs (token ids and image tensors)")
    item = processor.prepare(conversation, **processor_options)
    images = []
    if item.media:
        pixels = torch.as_tensor(item.pixel_values)  # (N, 3, H, W): every item's tiles, in order
        offset = 0
        for media in item.media:
            images.append(ImageInput(pixels[offset : offset + media.num_tiles], media.sha256))
            offset += media.num_tiles
    return PromptInputs(list(item.input_ids), images)


def image_spans(prompt: PromptInputs, request_id: int, vocab_size: int, image_token_id: int, image_seq_len: int) -> list[ImageSpan]:
    """Check the prompt against its images (the admission check: ids in range, one `<image>` token per
    image feature) and pair each image with the positions of its tokens."""
    ids = prompt.input_ids
    if any(not 0 <= t < vocab_size for t in ids):
        raise RequestError(f"request {request_id}: token ids must be in [0, {vocab_size})")
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    needed = 0
    for image in prompt.images:
        if image.pixel_values.dim() != 4:
            raise RequestError(
                f"request {request_id}: an image's pixel_values should be (n_tiles, 3, H, W), got {tuple(image.pixel_values.shape)}"
            )
        needed += image.pixel_values.shape[0] * image_seq_len
    if needed != len(positions):
        raise RequestError(
            f"request {request_id}: the prompt has {len(positions)} <image> tokens but its "
            f"{len(prompt.images)} images need {needed} ({image_seq_len} per tile)"
        )
    spans, offset = [], 0
    for image in prompt.images:
        n = image.pixel_values.shape[0] * image_seq_len
        spans.append(ImageSpan(tuple(positions[offset : offset + n]), image.content_hash, image))
        offset += n
    return spans
