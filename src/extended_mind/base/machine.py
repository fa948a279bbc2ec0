"""What the machine offers: the CPU's model and instruction-set flags, and whether bfloat16 matmuls are fast."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_info() -> dict:
    """The CPU model and the instruction-set flags that decide the scan's and the weights' speed (/proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in _FLAGS if f in flags]}


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here: CUDA, or a CPU with AVX512-BF16 / AMX (else they are emulated)."""
    if device.type == "cuda":
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False
