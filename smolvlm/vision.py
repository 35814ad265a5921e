"""SigLIP vision tower: image tiles -> one hidden vector per 16x16 patch.

Matches `SmolVLMVisionTransformer` and friends in transformers/models/smolvlm/modeling_smolvlm.py
(themselves Idefics3's). Tiles may be partly padding (a non-square image's last row/column of
tiles is padded to 512x512): `patch_attention_mask` marks the patches that hold real pixels. Padded
patches are still computed as queries (their outputs flow into the connector, as in transformers)
but are never attended to as keys.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from smolvlm.config import VisionConfig
from smolvlm.hookpoint import HookPoint, attention_probabilities, is_hooked, weighted_values
from smolvlm.linear import Embedding, Linear, scaled_dot_product_attention


def patch_position_ids(patch_attention_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position-embedding index of every patch, for tiles whose valid region may be smaller than the grid.

    The valid region (h x w patches, top-left) is stretched over the full `patches_per_side`^2 table:
    patch (i, j) gets bucket(i / h) * side + bucket(j / w), where bucket() finds which of `side` equal
    intervals of [0, 1) the fraction falls in. A full tile gets the identity 0..side^2-1. Padded
    patches get position 0. Same float32 arithmetic as transformers 5.24
    (SmolVLMVisionEmbeddings.forward), so bucket edges fall the same way.

    patch_attention_mask: (N, Hp, Wp) bool. Returns (N, Hp*Wp) long.
    """
    n, rows, cols = patch_attention_mask.shape
    device = patch_attention_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    step_h = 1.0 / patch_attention_mask[:, :, 0].sum(dim=1)  # (N,) 1 / valid patches down the first column
    step_w = 1.0 / patch_attention_mask[:, 0, :].sum(dim=1)  # (N,) 1 / valid patches along the first row
    frac_h = torch.arange(rows, device=device, dtype=torch.float32)[None, :] * step_h[:, None]  # (N, Hp)
    frac_w = torch.arange(cols, device=device, dtype=torch.float32)[None, :] * step_w[:, None]  # (N, Wp)
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, Hp)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, Wp)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(n, -1)  # (N, Hp*Wp)
    return torch.where(patch_attention_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionAttentionFn(Protocol):
    """q/k/v (N, T, H, D), key_padding_mask (N, T) bool (True = real patch) or None -> (N, T, H, D)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None, *, scale: float) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """Bidirectional attention with key padding, PyTorch SDPA (the reference, any device).
    The Triton equivalent is `smolvlm_kernels.masked_attention`, same arguments."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (N, 1, 1, T)
    # (N, T, H, D) -> (N, H, T, D) and back
    out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor) -> torch.Tensor:
        # pixel_values (N, C, H, W) -> patches (N, D, Hp, Wp) -> (N, Hp*Wp, D)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        position_ids = patch_position_ids(patch_attention_mask, self.patches_per_side)
        return embeddings + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        d = config.hidden_size
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)
        self.weights = HookPoint()  # attention probabilities, computed only when hooked (hookpoint.py)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, attention: VisionAttentionFn) -> torch.Tensor:
        n, t, d = x.shape
        # (N, T, D) -> (N, T, heads, head_dim)
        q = self.q_proj(x).view(n, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, t, self.num_heads, self.head_dim)
        out = attention(q, k, v, key_mask, scale=self.scale)  # (N, T, heads, head_dim), bidirectional
        if is_hooked(self.weights):  # the probabilities, only when asked for (hookpoint.py)
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, heads, T, head_dim)
            allowed = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, T)
            probabilities = attention_probabilities(qh, kh, allowed, self.scale)  # (N, heads, T, T)
            replaced = self.weights(probabilities)
            if replaced is not probabilities:
                out = weighted_values(replaced, vh).transpose(1, 2)
        return self.out_proj(out.reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, attention: VisionAttentionFn) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask, attention)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, attention: VisionAttentionFn,
                *, checkpoint: bool = False) -> torch.Tensor:
        for layer in self.layers:
            if checkpoint and torch.is_grad_enabled():  # gradient checkpointing, one layer at a time
                x = torch.utils.checkpoint.checkpoint(layer, x, key_mask, attention, use_reentrant=False)
            else:
                x = layer(x, key_mask, attention)
        return x


class VisionTransformer(nn.Module):
    """Tiles (N, 3, H, W) + patch mask (N, Hp, Wp) -> patch features (N, Hp*Wp, D). No pooling head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        attention: VisionAttentionFn = sdpa_attention,
        *,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        n, _, height, width = pixel_values.shape
        p = self.config.patch_size
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(n, height // p, width // p, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_attention_mask)
        flat_mask = patch_attention_mask.reshape(n, -1)  # (N, T)
        # A mask only when some key is padding: the unmasked path is the common, faster one.
        key_mask = None if bool(flat_mask.all()) else flat_mask  # (N, T), True = real patch
        x = self.encoder(x, key_mask, attention, checkpoint=checkpoint)
        return self.post_layernorm(x)


def patch_mask_from_pixels(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel mask (N, H, W) -> patch mask (N, H/p, W/p): a patch is valid if any of its pixels is.

    (transformers: SmolVLMModel.get_image_features, the unfold/sum step)
    """
    n, h, w = pixel_attention_mask.shape
    rows, cols = h // patch_size, w // patch_size  # a remainder is dropped, as the patch conv drops it
    crop = pixel_attention_mask[:, : rows * patch_size, : cols * patch_size]
    grid = crop.reshape(n, rows, patch_size, cols, patch_size)
    return grid.any(dim=4).any(dim=2)  # (N, Hp, Wp)
