"""A plain generation loop for one conversation that honours every hook (no paged cache, no C
kernels, no CUDA graphs): each new token is one whole-sequence forward pass, so a hook sees the
same (1, T, ...) tensors as in `model(...)`, step after step. Slow (quadratic), on purpose readable.

    result = generate(model, processor, conversation, max_new_tokens=32)
    result.text, result.token_ids, result.input_ids

The image features are computed once, before the first step (the vision and connector hooks fire
once); the decoder runs over the whole sequence at every step, and `lm_head` over its last
position only ((1, 1, vocab)). Greedy decoding: what is being studied, not sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from smolvlm.text import CausalAttention


@dataclass
class Generation:
    input_ids: list[int]  # the prompt
    token_ids: list[int]  # the answer, stop token excluded
    text: str
    media: list = field(default_factory=list)  # the processor's MediaItems (kind, rows, cols, timestamps)
    pixel_values: torch.Tensor | None = None  # (N, 3, H, W): what the vision tower saw

    @property
    def sequence(self) -> torch.Tensor:
        """(1, T) prompt + answer."""
        return torch.tensor([self.input_ids + self.token_ids])


def stop_token_ids(model, processor) -> set[int]:
    stops = set()
    for token in (processor.config.tokens.end_of_utterance, "<|im_end|>"):
        try:
            stops.add(processor.tokenizer.token_to_id(token))
        except ValueError:
            pass
    return stops


@torch.no_grad()
def generate(model, processor, conversation, max_new_tokens: int = 64, **processor_options) -> Generation:
    """Greedy answer to one conversation, one full forward pass per token (hooks see every step)."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    item = processor.prepare(conversation, **processor_options)
    device = model.device
    features = None
    if item.pixel_values is not None:
        features = model.image_features(item.pixel_values.to(device))  # (tiles, image_seq_len, hidden)
    stops = stop_token_ids(model, processor)
    ids = list(item.input_ids)
    # the prompt's <image> positions: a generated <image> token has no features
    image_positions = torch.tensor([i for i, t in enumerate(ids) if t == model.config.image_token_id], dtype=torch.long)
    answer: list[int] = []
    limit = model.config.text.max_position_embeddings
    for _ in range(max_new_tokens):
        if len(ids) >= limit:
            break
        input_ids = torch.tensor([ids], device=device)  # (1, T)
        embeds = model.embed(input_ids, features, image_positions.to(device))  # (1, T, hidden)
        positions = torch.arange(len(ids), device=device)[None]  # (1, T)
        hidden = model.decode(embeds, positions, CausalAttention(None, len(ids), device))  # (1, T, hidden)
        logits = model.logits(hidden[:, -1:])  # (1, 1, vocab)
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        answer.append(token)
        ids.append(token)
    text = processor.decode(answer, skip_special_tokens=True)
    return Generation(list(item.input_ids), answer, text, item.media, item.pixel_values)
