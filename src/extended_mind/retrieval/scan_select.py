"""Which exact-search scan this machine runs, chosen by measuring, never by assumption.

The scans (retrieval/scan.py) differ by machine by an order of magnitude: on an AVX2-only AMD EPYC, `torch._int_mm` took
52.9 ms where the float32 matmul of the same keys took 3.3 ms, while on an AVX512-VNNI Xeon int8 is the fastest.
So on first use each candidate (the VNNI and AVX2 kernels, `_int_mm`, bfloat16, and the plain float32 scan of the
keys themselves) shortlists a decode step's queries over 16k random keys, and the fastest is used from then on; the
plain float32 scan is always a candidate, so the choice is never slower than it as measured. The figures are cached
per machine (CPU model and flags, torch version, thread count) next to the built kernel, logged at debug level, and
shown by `benchmarks/speed.py`. EXTENDED_MIND_SCAN=int8-vnni|int8-avx2|int8|bfloat16|float32 overrides the choice
(a path this machine cannot run falls back to measuring, with a warning)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from extended_mind.base.machine import cpu_info, fast_bfloat16
from extended_mind.base.paths import cache_dir
from extended_mind.retrieval.exact import exact_scores
from extended_mind.retrieval.native import scan_kernel, scan_kernel_avx2
from extended_mind.retrieval.scan import (
    PACKED_KINDS,
    KeyScan,
    fast_topk,
    int8_matmul_available,
    shortlist_size,
)

log = logging.getLogger(__name__)


SCAN_ENV = "EXTENDED_MIND_SCAN"


SCAN_PATHS = ("int8-vnni", "int8-avx2", "int8", "bfloat16", "float32")


PLAIN = "float32"  # no compact copy: the keys themselves are scanned


# The measured shape: one decode step of SmolLM2 (3 KV heads x 3 query rows, head dim 64) over 16k keys, top-10.
PROBE = {"heads": 3, "rows": 3, "keys": 16384, "dim": 64, "k": 10, "repeats": 15}


# The compiled kernels read the same packed keys, so each call can use the one that is faster for its number of query
# rows. They are compared over a larger memory than PROBE's (where fixed costs dominate): a decode step's few rows,
# and a prompt's many (measured on an AMD EPYC with both: the VNNI kernel 3.1x faster than the AVX2 one for 1,500
# rows over 262k keys, while PROBE had the AVX2 kernel ahead).
KERNEL_PROBES = {
    "few": {"heads": 1, "rows": 3, "keys": 131072, "dim": 64, "k": 10, "repeats": 9},
    "many": {"heads": 1, "rows": 256, "keys": 131072, "dim": 64, "k": 10, "repeats": 5},
}




def available_paths() -> list[str]:
    """The scans this machine can run, fastest-in-theory first (the order only breaks exact ties)."""
    paths = []
    if scan_kernel() is not None:
        paths.append("int8-vnni")
    if scan_kernel_avx2() is not None:
        paths.append("int8-avx2")
    if int8_matmul_available():
        paths.append("int8")
    return [*paths, "bfloat16", PLAIN]


def measure(paths: list[str], probe: dict = PROBE) -> dict[str, float]:
    """Median ms of one shortlist + exact re-scoring (or, for float32, the plain top-k over all keys) per path.
    The paths take turns in every repeat, so a burst of load from elsewhere slows them alike."""

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(probe["heads"], probe["keys"], probe["dim"], generator=g)
    q = torch.randn(1, probe["heads"], probe["rows"], probe["dim"], generator=g)
    k, size = probe["k"], shortlist_size(probe["k"], probe["keys"])
    calls = {}
    for path in paths:
        if path == PLAIN:
            calls[path] = lambda: fast_topk(torch.matmul(q, keys.transpose(1, 2)), k)
        else:
            key_scan = KeyScan.of_kind(keys, path)  # this path's own kernel
            calls[path] = lambda s=key_scan: exact_scores(q, keys, s.shortlist(q, size))
        calls[path]()  # warm up: first calls allocate, and the kernel's first call may load
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(probe["repeats"]):
        for path, call in calls.items():
            start = time.perf_counter()
            call()
            times[path].append((time.perf_counter() - start) * 1000)
    return {p: statistics.median(t) for p, t in times.items()}


def choose(timings: dict[str, float]) -> str:
    """The fastest measured path (the plain scan must be among them: nothing is chosen that is slower than it)."""
    if PLAIN not in timings:
        raise ValueError("the plain float32 scan must be measured: it is the bound every choice is held to")
    return min(timings, key=lambda p: (timings[p], SCAN_PATHS.index(p)))


def _cache_file() -> Path:

    return cache_dir() / "kernels" / f"torch-{torch.__version__}" / "scan-choice.json"


def _machine_key(info: dict) -> str:
    return f"{info['model']}|{','.join(info['flags'])}|threads={torch.get_num_threads()}"


@lru_cache(maxsize=1)
def scan_path() -> str:
    """The scan exact search uses on this CPU (see the module docstring)."""
    paths = available_paths()
    forced = os.environ.get(SCAN_ENV, "").strip()
    if forced and forced != "auto":
        if forced in paths:
            log.debug("scan path %s (set by %s)", forced, SCAN_ENV)
            return forced
        log.warning("%s=%s cannot run here (available: %s); measuring instead", SCAN_ENV, forced, ", ".join(paths))
    report = scan_report()
    return report["choice"]


def kernels(report: dict) -> str:
    """The compiled kernels a report picked per call, in words (for benchmarks)."""
    picked = report.get("kernels")
    if not picked:
        return "the scan's own"
    return f"{picked['few']} for a decode step's rows, {picked['many']} for a prompt's (ms: {picked['ms']})"


@lru_cache(maxsize=2)
def packed_kernel(many_rows: bool) -> str | None:
    """The compiled kernel that scans packed keys fastest here for calls with many query rows (or few), as
    measured; None: each scan's own (one kernel only, or a path set by EXTENDED_MIND_SCAN)."""
    if os.environ.get(SCAN_ENV, "").strip() not in ("", "auto"):
        return None
    picked = scan_report().get("kernels")
    return picked["many" if many_rows else "few"] if picked else None


def scan_report() -> dict:
    """{"choice", "ms" (per path), "machine", "cached", and with two compiled kernels "kernels" (the faster one for
    few and for many query rows, with their ms)}: measured on first use on this machine, then read back."""
    machine = cpu_info()
    path, key = _cache_file(), _machine_key(machine)
    try:
        cached = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    paths = available_paths()
    packed = [p for p in paths if p in PACKED_KINDS]
    if (
        cached
        and set(cached.get("ms", {})) == set(paths)
        and cached.get("choice") in paths
        and (len(packed) < 2 or set(cached.get("kernels", {}).get("ms", {}).get("few", {})) == set(packed))
    ):
        return {**cached, "machine": machine, "cached": True}
    timings = measure(paths)
    report = {"choice": choose(timings), "ms": {p: round(t, 4) for p, t in timings.items()}}
    log.debug("scan path %s; measured ms per decode-step shortlist: %s", report["choice"], report["ms"])
    if len(packed) > 1:
        ms = {regime: measure(packed, probe) for regime, probe in KERNEL_PROBES.items()}
        report["kernels"] = {regime: min(t, key=lambda p: (t[p], SCAN_PATHS.index(p))) for regime, t in ms.items()}
        report["kernels"]["ms"] = {regime: {p: round(v, 4) for p, v in t.items()} for regime, t in ms.items()}
        log.debug("packed-key kernels per call: %s", report["kernels"])
    try:  # a read-only cache only costs a new measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = report
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.debug("scan choice not cached: %s", exc)
    return {**report, "machine": machine, "cached": False}


def build_scan(keys: torch.Tensor) -> KeyScan | None:
    """The fastest scan for keys (H, N, D) on their device, or None when scanning the keys themselves is as fast:
    on a CPU the path measured fastest here, on a GPU bfloat16 for float32 keys."""
    if keys.device.type == "cpu":
        kind = scan_path()
        return None if kind == PLAIN else with_measured_kernels(KeyScan.of_kind(keys, kind))
    if keys.dtype == torch.float32 and fast_bfloat16(keys.device):
        return KeyScan.of_kind(keys, "bfloat16")
    return None


def with_measured_kernels(key_scan: KeyScan) -> KeyScan:
    """`key_scan` scanning with the compiled kernel measured faster here for each number of query rows."""
    if key_scan.packed is None:
        return key_scan
    return replace(key_scan, row_kernels=(packed_kernel(False), packed_kernel(True)))
