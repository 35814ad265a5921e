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


def check_prompt(prompt: object, request_id: int, vocab_size: int, tile_size: int) -> None:
    """The types and shapes of a PromptInputs built by hand (the processor's are right by construction)."""
    where = f"request {request_id}"
    if not isinstance(prompt, PromptInputs):
        raise RequestError(f"{where}: expected PromptInputs, got {type(prompt).__name__}")
    ids = prompt.input_ids
    if not isinstance(ids, list) or not ids:
        raise RequestError(f"{where}: input_ids must be a non-empty list of ints, got {type(ids).__name__}")
    if any(type(t) is not int for t in ids):
        bad = next(t for t in ids if type(t) is not int)
        raise RequestError(f"{where}: input_ids must be ints, got {bad!r} ({type(bad).__name__})")
    if any(not 0 <= t < vocab_size for t in ids):
        raise RequestError(f"{where}: token ids must be in [0, {vocab_size})")
    if not isinstance(prompt.images, list) or any(not isinstance(i, ImageInput) for i in prompt.images):
        raise RequestError(f"{where}: images must be a list of ImageInput")
    for n, image in enumerate(prompt.images):
        pixels = image.pixel_values
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise RequestError(f"{where}, image {n}: pixel_values must be a floating-point torch.Tensor")
        if pixels.dim() != 4 or pixels.shape[0] < 1 or tuple(pixels.shape[1:]) != (3, tile_size, tile_size):
            raise RequestError(
                f"{where}, image {n}: pixel_values should be (n_tiles >= 1, 3, {tile_size}, {tile_size}), "
                f"got {tuple(pixels.shape)}"
            )
        if not isinstance(image.content_hash, str) or not image.content_hash:
            raise RequestError(f"{where}, image {n}: content_hash must be a non-empty string")
        try:
            image.content_hash.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{where}, image {n}: content_hash is not valid Unicode") from None
        mask = image.pixel_attention_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (pixels.shape[0], tile_size, tile_size)):
            raise RequestError(f"{where}, image {n}: pixel_attention_mask should be (n_tiles, {tile_size}, {tile_size}) or None")


def image_spans(
    prompt: PromptInputs, request_id: int, vocab_size: int, image_token_id: int, image_seq_len: int, tile_size: int
) -> list[ImageSpan]:
    """Check the prompt against its images (the admission check: types and shapes, ids in range, one
    `<image>` token per image feature) and pair each image with the positions of its tokens."""
    check_prompt(prompt, request_id, vocab_size, tile_size)
    ids = prompt.input_ids
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    needed = sum(image.pixel_values.shape[0] * image_seq_len for image in prompt.images)
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
