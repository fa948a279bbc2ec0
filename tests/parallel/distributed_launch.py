"""Start N local ranks of sharded_worker.py on gloo, as torchrun would (but without torchrun's agent, which
kills the other ranks when one dies: the fault tests need to see what rank 0 reports)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("sharded_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, scenario: str, out_dir: Path, memory_dir: Path | None = None, timeout: float = 600,
           collective_timeout: float = 60) -> list[dict]:  # fmt: skip
    """Run the scenario on `world` ranks; returns each rank's JSON (or {"ok": False, "exit": code} when a rank
    wrote none). Raises if the ranks do not finish within `timeout` seconds (a hang)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "EXTENDED_MIND_DIST_TIMEOUT": str(collective_timeout),
        }  # fmt: skip
        args = [sys.executable, str(WORKER), scenario, str(out_dir)] + ([str(memory_dir)] if memory_dir else [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"the {world} ranks did not finish within {timeout} s (hung)") from None
    results = []
    for rank, p in enumerate(procs):
        f = out_dir / f"rank{rank}.json"
        results.append(json.loads(f.read_text()) if f.is_file() else {"ok": False, "exit": p.returncode})
        results[-1]["log"] = logs[rank][-3000:]
    return results
