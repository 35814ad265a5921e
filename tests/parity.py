"""Helpers for comparing our tensors with transformers' (llm.c-style `check_tensor`)."""

from __future__ import annotations

import torch


def max_abs_diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    diff = (ours.float() - ref.float()).abs()
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.max()), where


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    """Fail with the max abs difference, where it is, and the values there."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in ours"
    worst, where = max_abs_diff(ours, ref)
    assert worst <= atol, (
        f"{name}: max abs diff {worst:.3g} > {atol:g} at index {where} "
        f"(ours {float(ours[where]):.6g}, reference {float(ref[where]):.6g}; reference max |x| "
        f"{float(ref.float().abs().max()):.4g})"
    )
    return worst


def assert_same_argmax(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    a, b = ours.argmax(-1), ref.argmax(-1)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, (
        f"{name}: argmax differs at {bad.shape[0]} of {a.numel()} positions, first at {tuple(bad[0].tolist())}: "
        f"ours {int(a[tuple(bad[0])])} vs reference {int(b[tuple(bad[0])])}"
    )
