"""The training objective: next-token cross-entropy on the labelled (assistant) tokens.

`LanguageModelLoss` is the module the training loop calls (and DistributedDataParallel wraps). It
runs the model's stages in order, as `SmolVLM.forward` does, with two differences that change
memory and time but not the numbers:

- the LM head runs only at positions that carry a loss (the answer tokens), not over the whole
  sequence: a prompt with one split image is ~1,000 tokens, and its logits would be
  1,000 x 49,280 floats (plus their gradient) for a few dozen labels;
- when nothing in the vision tower and the connector is trained, image features are computed
  without autograd and, given a cache (the engine's `VisionFeatureCache`: content hash -> features,
  LRU within a byte budget), kept by content hash: a later epoch skips the tower for images it has seen.

It returns the *sum* of the token losses; the caller divides by the number of labelled tokens of
the whole optimizer step (all micro-batches, all processes), so gradient accumulation and several
processes give the gradient of one big batch's mean loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.engine.runner import VisionFeatureCache
from smolvlm.linear import Linear, linear
from smolvlm.text import CausalAttention
from smolvlm.train.data import IGNORE, Batch


class LanguageModelLoss(nn.Module):
    def __init__(self, model: nn.Module, *, checkpoint: bool = False, feature_cache: VisionFeatureCache | None = None):
        super().__init__()
        self.model = model
        self.checkpoint = checkpoint
        self.feature_cache = feature_cache
        self.cache_hits = self.cache_misses = 0  # media items found in / missing from the cache

    def vision_frozen(self) -> bool:
        parts = (self.model.model.vision_model, self.model.model.connector)
        return not any(p.requires_grad for part in parts for p in part.parameters())

    def image_features(self, batch: Batch) -> torch.Tensor | None:
        """(n_tiles, image_seq_len, hidden) for the batch's real tiles, in prompt order."""
        if batch.pixel_values is None:
            return None
        model, device = self.model, self.model.device
        if not self.vision_frozen():
            mask = None if batch.pixel_attention_mask is None else batch.pixel_attention_mask.to(device)
            return model.image_features(batch.pixel_values.to(device), mask, checkpoint=self.checkpoint)
        # Frozen: no autograd graph, one media item at a time (through the cache when there is one),
        # and on CPU one tile per call: nothing is kept for a backward pass, so batching tiles buys
        # no speed there (each tile is already a 1,024-row product) and would hold every tile's
        # attention scores at once (measured on a 13-tile image: 30.5 s and +484 MiB tile by tile,
        # 35.8 s and +861 MiB in one call; the features are the same, bit for bit, on this machine).
        with torch.no_grad():
            pieces = []
            for row, items in enumerate(batch.media):
                start = 0
                for key, tiles in items:
                    features = None if self.feature_cache is None else self.feature_cache.get(key)
                    if self.feature_cache is not None:
                        self.cache_hits += features is not None
                        self.cache_misses += features is None
                    if features is None:
                        pixels = batch.pixel_values[row, start : start + tiles].to(device)  # (tiles, 3, H, W)
                        mask = batch.pixel_attention_mask[row, start : start + tiles].to(device)  # (tiles, H, W)
                        step = 1 if device.type == "cpu" else tiles
                        features = torch.cat([model.image_features(pixels[None, i : i + step], mask[None, i : i + step])
                                              for i in range(0, tiles, step)])  # (tiles, S, hidden)
                        if self.feature_cache is not None:
                            self.feature_cache.put(key, features)
                    pieces.append(features)
                    start += tiles
            return torch.cat(pieces)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Sum over labelled tokens of -log p(label | tokens before it); fp32 scalar."""
        model, device = self.model, self.model.device
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        embeds = model.embed(input_ids, self.image_features(batch))  # (B, T, D)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # right padding: 0..n-1 on real tokens
        attention = CausalAttention(attention_mask, input_ids.shape[1], device)
        hidden = model.decode(embeds, positions, attention, checkpoint=self.checkpoint)  # (B, T, D)
        targets = batch.labels[:, 1:].to(device)  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE
        logits = head_logits(model, hidden[:, :-1][keep])  # (n_labels, vocab), only where there is a loss
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


# Vocabulary rows per block of the LM head's matrix product (see head_logits).
HEAD_BLOCK = 1024


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """model.logits(hidden), hidden (n, D) -> (n, vocab), computed in blocks of HEAD_BLOCK vocabulary rows.

    Why blocks: the backward of the head sums over the whole vocabulary (49,280 terms that nearly
    cancel: softmax minus one-hot) for each input row. One matrix product over a few rows sums them
    in one long run, and its fp32 error grows with the length; autograd adds the blocks' products
    instead. Measured against fp64 on the grafted checkpoint (the gradient of the last hidden states):
    3.3e-5 relative error in one product, 6.8e-6 in blocks of 4,096, 6.5e-6 in blocks of 1,024,
    6.4e-6 for transformers' head over every position; on a video batch with 3 labelled tokens,
    4.3e-6 in blocks of 4,096, 1.2e-6 in blocks of 1,024, 2.4e-6 for transformers'. The forward is
    the same numbers either way (each logit is one dot product of length D)."""
    head = model.lm_head
    if type(head) is not Linear or head._forward_hooks or head._forward_pre_hooks:
        return model.logits(hidden)  # a wrapped or hooked head: call it as it is
    return torch.cat([linear(hidden, block) for block in head.weight.split(HEAD_BLOCK)], dim=-1)
