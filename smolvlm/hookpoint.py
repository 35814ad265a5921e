"""Hook points that are not layers of the checkpoint: values a researcher wants to see or change
that no module returns.

Every module of `SmolVLM` is already a place to hook (PyTorch forward hooks, under the module's
`named_modules()` name, which is the checkpoint's tensor prefix). Two kinds of value are not the
output of any module, so the model passes them through a `HookPoint` (an identity module) to give
them a name too:

- `model.text_model.inputs_embeds`: the decoder's input, token embeddings with the image features
  already written in (SmolVLM.embed);
- `...layers.{i}.self_attn.weights` (decoder and vision tower): the attention probabilities
  (B, H, Tq, Tk). These are never computed unless a hook is registered on that very point (a
  global `register_module_forward_hook` does not count: it would make every call pay for them).
  A hook that only reads them leaves the layer's output as it was (bit for bit, the fast attention
  kernel's); a hook that returns a replacement makes the layer use `replacement @ V` instead.

`smolvlm.research` builds capture (`run_with_cache`) and interventions (`hooks`) on these.
"""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Module):
    """The identity, as a module: hooks registered on it see (and may replace) the value passed in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def is_hooked(module: nn.Module) -> bool:
    """Whether hooks are registered on this module itself (global module hooks are not counted)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, H, T, D): each KV head serves H / Hkv query heads (grouped-query attention)."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) over the allowed keys, as transformers' eager attention computes it
    (scores in the input dtype, softmax in fp32, masked scores set to the dtype's minimum).

    q (B, H, Tq, D), k (B, Hkv, Tk, D), allowed broadcastable to (B, H, Tq, Tk) bool or None -> (B, H, Tq, Tk)."""
    k = expand_kv_heads(k, q.shape[1])
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Tq, Tk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def weighted_values(probabilities: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probabilities (B, H, Tq, Tk) @ v (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    return torch.matmul(probabilities.to(v.dtype), expand_kv_heads(v, probabilities.shape[1]))
