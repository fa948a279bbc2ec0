"""The optional compiled kernels: int8 scans (kernels/scan_int8.cpp, AVX512-VNNI and AVX2 builds) and the fused
slot attention of a decode row (kernels/slot_attend.cpp, attention/slot_step.py) and the native decode step
(kernels/decode_step.cpp, engine/fast_step.py), each built on first use.

`torch._int_mm` reads int8 keys at about half the memory bandwidth when a query batch has a few rows (decode), and
exact search then has to rank the (rows x keys) scores it wrote. The kernel scans packed keys at close to the
bandwidth and keeps each row's shortlist while it scans. They are compiled once per machine with the compiler torch
uses (into the extended-mind cache) and are optional: without a compiler, ninja or the instructions, search uses
another scan and slot attention its torch operations. Which scan runs is measured per machine (scan_select.py).
Set EXTENDED_MIND_NATIVE=0 to turn all of them off.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from extended_mind.base.paths import cache_dir

log = logging.getLogger(__name__)


NATIVE_ENV = "EXTENDED_MIND_NATIVE"


_KERNELS = Path(__file__).parents[1] / "kernels"
_SCAN_FUNCTIONS = ["scan_int8", "scan_int8_topk", "scan_int8_topk_cells"]


# Keys per packed block: one 512-bit register holds 4 dimensions of 16 keys.
BLOCK = 16


def _cpu_has_vnni() -> bool:
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
    try:
        return bool(check and avx512 and check() and avx512())
    except RuntimeError:
        return False


def _cpu_has_avx2() -> bool:
    check = getattr(torch.cpu, "_is_avx2_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


def _build(name: str, flags: list[str], source: str | tuple[str, ...], functions: list[str]) -> ModuleType | None:
    """Compile kernels/`source` (or several, in one module) with `flags` into the extended-mind cache (once per
    machine and torch)."""

    # resolved: torch rebuilds when the build directory's path changes, and a cache reached through a link is the same
    build = (cache_dir() / "kernels" / f"torch-{torch.__version__}" / name).resolve()
    try:
        from torch.utils.cpp_extension import load_inline

        build.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_inline(
                name,
                cpp_sources=[(_KERNELS / f).read_text() for f in ((source,) if isinstance(source, str) else source)],
                functions=functions,
                extra_cflags=["-O3", *flags],
                extra_ldflags=[f for f in flags if f == "-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch paths are as correct
        log.warning("kernel %s not built (%s)", name, str(exc).splitlines()[0][:200])
        return None


def _kernel(name: str, supported: bool, isa: str, flags: list[str], source: str | tuple[str, ...] = "scan_int8.cpp",
            functions: list[str] = _SCAN_FUNCTIONS) -> ModuleType | None:  # fmt: skip
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    if not supported:
        log.info("kernel %s not used: this CPU has no %s", name, isa)
        return None
    return _build(name, flags, source, functions)


@lru_cache(maxsize=1)
def scan_kernel() -> ModuleType | None:
    """The compiled AVX512-VNNI kernel module, or None where it cannot be used here (reason logged)."""
    return _kernel("extended_mind_scan_int8", _cpu_has_vnni(), "AVX512-VNNI",
                   ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"])  # fmt: skip


@lru_cache(maxsize=1)
def scan_kernel_avx2() -> ModuleType | None:
    """The same kernel for AVX2 (vpmaddubsw/vpmaddwd, exact scores), or None where it cannot be used here."""
    return _kernel("extended_mind_scan_int8_avx2", _cpu_has_avx2(), "AVX2",
                   ["-mavx2", "-mfma", "-DEM_AVX2", "-fopenmp"])  # fmt: skip


@lru_cache(maxsize=1)
def slot_kernel() -> ModuleType | None:
    """The fused slot attention of one decode row (float32 loops the compiler vectorizes for AVX2; AVX512 CPUs run
    it too; OpenMP, so that at::parallel_for shares its chunks among torch's threads), or None where it cannot be
    built here."""
    return _kernel("extended_mind_slot_attend", _cpu_has_avx2(), "AVX2", ["-mavx2", "-mfma", "-fopenmp"],
                   "slot_attend.cpp", ["slot_attend"])  # fmt: skip


@lru_cache(maxsize=1)
def decode_kernel() -> ModuleType | None:
    """A decode token through every decoder layer in one call (kernels/decode_step.cpp, engine/fast_step.py), with
    the slot attention of a layer that reads block memory (slot_attend.cpp, built in): ATen operators and plain
    loops, vectorized for AVX2 where the CPU has it; None where it cannot be built here."""
    avx2 = _cpu_has_avx2()
    return _kernel("extended_mind_decode_step" + ("_avx2" if avx2 else ""), True, "",
                   ["-mavx2", "-mfma", "-fopenmp"] if avx2 else ["-fopenmp"], ("slot_attend.cpp", "decode_step.cpp"),
                   ["decode_layers"])  # fmt: skip


def pack_keys(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (H, N, D), D a multiple of 4, -> packed (H, B, D*16) and column sums (H, B*16) int32, with
    B = ceil(N / 16) blocks (missing keys in the last block are zeros, which the kernel never returns)."""
    h, n, d = codes.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(h, blocks * BLOCK, d, dtype=torch.int8, device=codes.device)
    padded[:, :n] = codes
    packed = padded.view(h, blocks, BLOCK, d // 4, 4).permute(0, 1, 3, 2, 4).reshape(h, blocks, d * BLOCK)
    return packed.contiguous(), padded.sum(-1, dtype=torch.int32).contiguous()
