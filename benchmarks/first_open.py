"""The first open ever of a saved memory, with per-tensor checksums (format 3) and with whole-file checksums (format
2, the same files under a manifest without per-tensor checksums), each in a fresh process:

    python benchmarks/million_tokens.py build --dir runs/m262k --tokens 270000
    python benchmarks/first_open.py --dir runs/m262k --threads 1 --repeats 2

"First open ever": no check of the memory's files remembered and nothing prepared or calibrated for it in the cache
(each run gets a cache directory of its own, linking the real one's converted model, compiled kernels and heads:
what a machine that has run extended-mind before has); the
relevance calibration and the prepared selection keys saved with the memory by the build, or not (the manifest
without them, as memories saved before they were); "reopened": a new process with the cache the first open left
(checks, prepared keys and the calibration kept). The page cache is
dropped before every run when this process may (root on Linux; `page_cache_dropped` says). Reported per run: the
time to open the manifest, to answer the first question (1 token, block memory: calibration, selection, reading),
the bytes and seconds spent hashing, and the seconds spent preparing the selection layers' keys and calibrating.
With the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# kept out of the per-run cache: what a first open ever has not got yet
FRESH = ("verified", "prepared")


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def manifest_view(memory_dir: Path, into: Path, version: int = 3, calibrated: bool = True,
                  prepared: bool = True) -> Path:  # fmt: skip
    """`memory_dir` as another memory: its manifest in format `version` (2: without per-tensor checksums), without
    the saved calibration unless `calibrated`, without the saved prepared keys unless `prepared`, its tensor files
    linked."""
    into.mkdir(parents=True)
    manifest = json.loads((memory_dir / "manifest.json").read_text())
    manifest["version"] = version
    if version < 3:
        for d in manifest["documents"]:
            d.pop("tensors", None)
    if not calibrated:
        manifest.pop("calibrations", None)
    if not prepared or version < 3:
        manifest.pop("prepared", None)
    (into / "manifest.json").write_text(json.dumps(manifest))
    (into / "tensors").symlink_to((memory_dir / "tensors").resolve())
    return into


def child(args: argparse.Namespace) -> None:
    """One open and first question in this process; prints a JSON line."""
    import torch

    from extended_mind import ExtendedMind
    from extended_mind.engine import positions, reading
    from extended_mind.memory import files, mapped

    torch.set_num_threads(args.threads)
    hashed = {"bytes": 0, "s": 0.0}
    prepared, calibrated = {"s": 0.0}, {"s": 0.0}

    def timed(real, into, size=None):
        """`real`, adding its seconds (and with `size`, the bytes it reads) to `into`."""

        def run(*a, **k):
            start = time.perf_counter()
            out = real(*a, **k)
            into["s"] += time.perf_counter() - start
            if size is not None:
                into["bytes"] += size(*a)
            return out

        return run

    files.range_sha256 = timed(files.range_sha256, hashed, lambda p, a, b: b - a)
    mapped.file_sha256 = timed(mapped.file_sha256, hashed, lambda p: p.stat().st_size)
    positions._prepare = timed(positions._prepare, prepared)  # noqa: SLF001 - timing the preparation alone
    reading.calibrate_relevance = timed(reading.calibrate_relevance, calibrated)
    mind = ExtendedMind.from_pretrained()
    start = time.perf_counter()
    memory = mind.load_memory(args.dir)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    answer = mind.generate(f"Question: {args.question}\nAnswer:", memory=memory, max_new_tokens=1, chat=False)
    first = time.perf_counter() - start
    print(json.dumps({"open_s": round(opened, 3), "first_question_s": round(first, 2),
                      "hashed_gb": round(hashed["bytes"] / 1e9, 2), "hashing_s": round(hashed["s"], 2),
                      "prepare_s": round(prepared["s"], 2), "calibrate_s": round(calibrated["s"], 2),
                      "blocks_read": answer.blocks_read,
                      "memory_gb": round(memory.nbytes / 1e9, 2), "tokens": memory.num_tokens}))  # fmt: skip


def fresh_cache(real: Path, into: Path) -> Path:
    """A cache directory with the real one's contents linked, except what a first open has not got (FRESH)."""
    into.mkdir(parents=True)
    if real.is_dir():
        for p in real.iterdir():
            if p.name not in FRESH:
                (into / p.name).symlink_to(p.resolve())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="a saved memory (benchmarks/million_tokens.py build)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--question", default="Who directed the film Actrius?")  # in the first documents
    parser.add_argument("--out", default="docs/first_open.json")
    parser.add_argument("--saved-only", action="store_true",
                        help="only the memory as saved and its reopening (at a million tokens the other variants "
                        "prepare 8 layers or hash 24 GB: minutes each)")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from extended_mind.base.paths import CACHE_ENV, cache_dir
    from extended_mind.retrieval.scan_select import available_paths, scan_report

    available_paths()  # the scan kernels are built once per machine (the first run of extended-mind there): not here
    machine = scan_report()["machine"]
    print(f"CPU {machine['model']} ({', '.join(machine['flags'])}), {args.threads} thread(s)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="first-open-") as tmp:
        manifest = json.loads((Path(args.dir) / "manifest.json").read_text())
        if not manifest.get("calibrations") or not manifest.get("prepared"):
            raise SystemExit(f"{args.dir} was saved without its calibration or prepared keys: run "
                             "million_tokens.py build on it again (it saves them)")  # fmt: skip
        unprepared = manifest_view(Path(args.dir), Path(tmp) / "unprepared", prepared=False)
        uncalibrated = manifest_view(Path(args.dir), Path(tmp) / "uncalibrated", calibrated=False, prepared=False)
        format2 = manifest_view(Path(args.dir), Path(tmp) / "format2", version=2, calibrated=False)
        # (name, memory, whether the run starts with the cache the run before it left: a later process)
        variants = [("format 3, prepared keys and calibration saved with the memory", Path(args.dir), False),
                    ("format 3, reopened by a new process", Path(args.dir), True),
                    ("format 3, calibration saved, prepared keys not saved", unprepared, False),
                    ("format 3, neither saved", uncalibrated, False),
                    ("format 2 (whole-file checksums), calibration not saved", format2, False)]  # fmt: skip
        if args.saved_only:
            variants = variants[:2]
        for r in range(args.repeats):
            for name, path, reopen in variants:
                if not reopen:
                    cache = fresh_cache(cache_dir(), Path(tmp) / f"cache-{r}-{len(rows)}")
                dropped = drop_page_cache()
                env = {**os.environ, CACHE_ENV: str(cache)}
                cmd = [sys.executable, __file__, "--child", "--dir", str(path), "--threads", str(args.threads),
                       "--question", args.question]  # fmt: skip
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{name}: the run failed:\n{done.stderr[-3000:]}")
                row = {"variant": name, "repeat": r, "page_cache_dropped": dropped,
                       **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "threads": args.threads, "runs": rows}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
