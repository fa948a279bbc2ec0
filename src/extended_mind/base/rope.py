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


def extend_table(cos: torch.Tensor, sin: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (P, R) extended to `length` positions. Every column of a rotary table is a * cos(p * theta)
    (sin likewise) with one frequency theta and magnitude a per column, whatever the scaling scheme (linear, YaRN,
    llama3), so the tables extrapolate exactly: theta is estimated at position 1 and refined at the last position
    (the phase there pins it down P - 1 times more precisely)."""
    p = cos.shape[0]
    if length <= p:
        return cos[:length], sin[:length]
    if p < 2:
        raise ValueError("a rotary table needs at least 2 positions to be extended")
    c, s = cos.double(), sin.double()
    amp = torch.sqrt(c[0] ** 2 + s[0] ** 2)
    rough = torch.atan2(s[1], c[1])
    last = torch.atan2(s[p - 1], c[p - 1])
    turns = torch.round((rough * (p - 1) - last) / (2 * torch.pi))
    theta = (last + 2 * torch.pi * turns) / (p - 1)
    angles = torch.arange(p, length, dtype=torch.float64)[:, None] * theta
    ext_cos = torch.cat([c, amp * torch.cos(angles)])
    ext_sin = torch.cat([s, amp * torch.sin(angles)])
    return ext_cos.to(cos.dtype), ext_sin.to(sin.dtype)
