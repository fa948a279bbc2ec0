"""Storage precisions for memory keys and values: float32, bfloat16, float16, or int8 with one scale per vector.

int8 is symmetric absmax quantization over the head dimension: each (head, token) vector of D numbers keeps D int8
values and one float32 scale, so SmolLM2 (D = 64) needs 68 bytes per vector instead of 256 in float32.
"""

from __future__ import annotations

import torch

from extended_mind.base.errors import ExtendedMindError

STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")


_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_storage(storage: str) -> str:
    if storage not in STORAGE_DTYPES:
        raise ExtendedMindError(f"unknown memory storage {storage!r}; choose one of {STORAGE_DTYPES}")
    return storage


def float_dtype(storage: str) -> torch.dtype | None:
    """The torch dtype a float storage keeps tensors in; None for int8 (codes and scales)."""
    return _FLOATS.get(storage)


def storage_of(dtype: torch.dtype) -> str:
    """The storage matching a model dtype (memories default to the precision the model computes in)."""
    for name, dt in _FLOATS.items():
        if dt == dtype:
            return name
    return "float32"


def encode(x: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (H, n, D) -> (data, scale): scale is (H, n) float32 for int8, else None."""
    if storage != "int8":
        return x.to(_FLOATS[storage]), None
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    q = torch.round(xf / scale.clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def decode(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `encode`: float tensors come back as stored, int8 as float32."""
    if scale is None:
        return data
    return data.float() * scale[..., None]
