"""Rotary position embedding helpers that work from the (cos, sin) a model hands to its attention layers.

Models in transformers apply RoPE as `k * cos + rotate_half(k) * sin` on the first `cos.shape[-1]` dims (partial
rotary leaves the rest alone). cos/sin may carry a magnitude (YaRN's attention factor), so the inverse divides by
cos² + sin².
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., n, head_dim) by cos/sin (n, rotary_dim), broadcasting over leading dims."""
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin
    return rot if rd == x.shape[-1] else torch.cat((rot, x[..., rd:]), dim=-1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `apply_rope`: recover pre-rotation vectors from rotated ones."""
    rd = cos.shape[-1]
    cos32, sin32 = cos.float(), sin.float()
    xr = x[..., :rd].float()
    pre = (xr * cos32 - rotate_half(xr) * sin32) / (cos32 * cos32 + sin32 * sin32)
    pre = pre.to(x.dtype)
    return pre if rd == x.shape[-1] else torch.cat((pre, x[..., rd:]), dim=-1)
