"""The vision tower with the Triton masked-attention kernel (interpreted on CPU) matches SDPA."""

from __future__ import annotations

import torch

from parity import assert_close
from smolvlm.config import VisionConfig
from smolvlm.vision import VisionTransformer, sdpa_attention


def test_vision_tower_triton_attention_matches_sdpa():
    import smolvlm_kernels

    torch.manual_seed(0)
    # head_dim 16: the kernels take power-of-two head dims (the tiny checkpoint's vision head_dim is 8)
    config = VisionConfig(hidden_size=64, num_attention_heads=4, patch_size=8, image_size=32,
                          num_hidden_layers=2, intermediate_size=96)
    # CUDA when present; else CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tower = VisionTransformer(config).eval().to(device)
    tiles = torch.randn(3, 3, 32, 32, device=device)
    patch_mask = torch.ones(3, 4, 4, dtype=torch.bool, device=device)
    patch_mask[1, 3:, :] = False  # a tile padded at the bottom
    patch_mask[2, :, 2:] = False  # and one padded on the right
    with torch.no_grad():
        ref = tower(tiles, patch_mask, sdpa_attention)
        got = tower(tiles, patch_mask, smolvlm_kernels.masked_attention)
    assert_close("vision tower, triton vs sdpa", got, ref, 2e-5)
