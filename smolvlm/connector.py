"""Pixel-shuffle connector: patch features -> decoder-sized image tokens.

Matches `SmolVLMConnector` (transformers/models/smolvlm/modeling_smolvlm.py). Pixel shuffle trades
sequence length for width: each r x r block of neighbouring patches becomes one token whose
features are the r^2 patch vectors side by side, so a 32x32 grid of 768-d patches becomes an 8x8 grid
of 12288-d tokens (r = 4), which one bias-free Linear projects to the decoder's width.
"""

from __future__ import annotations

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig
from smolvlm.linear import Linear


def pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """(N, S*S, D) -> (N, S*S/r^2, D*r^2), r = scale_factor.

    Output token (R, C) on the (S/r)^2 grid holds, in channel block dy*r + dx, the input patch at
    row r*R + dy, column r*C + dx. Written as one reshape/permute; transformers' version takes
    four steps to reach the same layout (tests check they agree).
    """
    n, seq, dim = x.shape
    side = int(seq**0.5)
    r = scale_factor
    x = x.reshape(n, side // r, r, side // r, r, dim)  # (N, R, dy, C, dx, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, R, C, dy, dx, D)
    return x.reshape(n, (side // r) ** 2, r * r * dim)  # (N, R*C, (dy, dx, D))


class ModalityProjection(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config.connector_input_size, config.text.hidden_size)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        # (N, 1024, 768) -> (N, 64, 12288) -> (N, 64, 576) for the 256M model
        return self.modality_projection(pixel_shuffle(patch_features, self.scale_factor))
