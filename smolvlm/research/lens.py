"""Logit lens: what the residual stream after each decoder layer would predict, read through the
final norm and the LM head (nostalgebraist, 2020).

    for layer, top in logit_lens(model, input_ids, position=-1, k=5):
        print(layer, [(processor.decode([t]), round(p, 3)) for t, p in top])
"""

from __future__ import annotations

import torch

from smolvlm.research.hooks import run_with_cache


@torch.no_grad()
def logit_lens(model, input_ids, position: int = -1, k: int = 5, pixel_values=None, pixel_attention_mask=None):
    """[(layer index, [(token id, probability), ...top k]), ...] for every decoder layer, at `position`
    of input_ids (1, T). The last layer's row is the model's own prediction."""
    layers = model.config.text.num_hidden_layers
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"logit_lens takes one sequence, input_ids (1, T); got {tuple(input_ids.shape)}")
    if not -input_ids.shape[1] <= position < input_ids.shape[1]:
        raise ValueError(f"position {position} is outside the {input_ids.shape[1]} tokens")
    names = [f"model.text_model.layers.{i}" for i in range(layers)]
    _, cache = run_with_cache(model, input_ids, pixel_values, pixel_attention_mask, names=names)
    out = []
    for i, name in enumerate(names):
        residual = cache[name][0, position]  # (hidden,)
        probabilities = torch.softmax(model.lm_head(model.model.text_model.norm(residual)).float(), dim=-1)
        top = probabilities.topk(k)
        out.append((i, [(int(t), float(p)) for t, p in zip(top.indices, top.values)]))
    return out
