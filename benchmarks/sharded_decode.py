"""Decode speed of a memory sharded over 1, 2 and 4 local processes (torchrun, gloo), and what the ranks exchange.

    python benchmarks/sharded_decode.py --tokens 65536 --worlds 1 2 4

For every world size it starts `torchrun --nproc-per-node W` on this script (W = 1 runs without a process group),
each rank memorizes Python's documentation (16k tokens, bfloat16) and tiles it to `--tokens` (documents repeated
under new ids: the sizes are real, the keys repeat), the memory is sharded over the ranks, and rank 0 times:
- decode ms/token (median over 2 runs of 16 tokens) with no memory, block memory (the default) and exact token
  retrieval;
- the bytes each rank sends per generated token and memory layer, and the collectives per token;
- the latency of one all_gather of a decode step's exchange (median of 200).
One thread per process. Writes docs/distributed.json and prints a table with the CPU model and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    from speed import PROMPTS, decode_ms, real_documents, tiled

    from extended_mind import ExtendedMind
    from extended_mind.parallel.group import init_from_env

    torch.set_num_threads(1)
    group = init_from_env()
    mind = ExtendedMind.from_pretrained()
    memory = tiled(mind.memorize(real_documents(mind.tokenizer, 16384), storage="bfloat16", progress=False),
                   args.tokens)  # fmt: skip
    memory = mind._shard(memory)
    layers = mind.model.config.num_hidden_layers
    out: dict = {"world": group.world if group else 1, "tokens": memory.num_tokens}
    ms, first = decode_ms(mind, None, 16, 2)
    out["no memory"] = {"ms": ms, "first_token_ms": first}
    for label, options in (("block memory", {}), ("token retrieval", {"retrieval": "tokens", "search": "exact"})):
        mind.stream(PROMPTS[0], memory=memory, max_new_tokens=1, **options)  # prepares the memory once
        seconds = group.seconds if group else 0.0
        ms, first = decode_ms(mind, memory, 16, 2, **options)
        row = {"ms": ms, "first_token_ms": first}
        if group:
            row["collective_ms_per_token"] = 1000 * (group.seconds - seconds) / 32
        if group:  # per decoded token: a 17-token answer's exchanges less a 1-token answer's (the prompt's part)
            counts = []
            for n in (1, 17):
                sent, calls = group.bytes_sent, group.collectives
                for _ in mind.stream(PROMPTS[0], memory=memory, max_new_tokens=n, **options):
                    pass
                counts.append((group.bytes_sent - sent, group.collectives - calls))
            row["prompt_bytes_per_layer"] = counts[0][0] / layers
            row["bytes_per_token_layer"] = (counts[1][0] - counts[0][0]) / 16 / layers
            row["collectives_per_token"] = (counts[1][1] - counts[0][1]) / 16
        out[label] = row
    if group:
        payload = torch.zeros(3 * 3 * 10 * (3 * 4 + 8 + 64 * 4), dtype=torch.uint8)  # a decode step's exchange
        times = []
        for _ in range(200):
            t = time.perf_counter()
            group.all_gather(payload)
            times.append(time.perf_counter() - t)
        out["all_gather_us"] = 1e6 * statistics.median(times)
        out["payload_bytes"] = payload.numel()
    if not group or group.rank == 0:
        Path(args.out).write_text(json.dumps(out))


def plot(report: dict, out: Path) -> None:
    """Decode ms/token and first-token ms by method and number of processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["no memory", "block memory", "token retrieval"]
    results = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(results)
    for ax, key, title in ((axes[0], "ms", "decode ms/token"), (axes[1], "first_token_ms", "first token ms")):
        for i, r in enumerate(results):
            xs = [m + (i - (len(results) - 1) / 2) * width for m in range(len(methods))]
            ax.bar(xs, [r[m][key] for m in methods], width, label=f"{r['world']} process(es)")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title)
    axes[0].legend()
    m = report["machine"]
    fig.suptitle(f"SmolLM2, {results[0]['tokens']:,}-token memory sharded over local processes\n{m['model']} "
                 f"({', '.join(m['flags'])}), {report['cpus']} cores, 1 thread each", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "distributed.json"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from extended_mind.retrieval.scan_select import scan_report

    machine = scan_report()["machine"]
    results = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            script = [str(Path(__file__).resolve()), "--worker", "--tokens", str(args.tokens), "--out", str(out)]
            cmd = [sys.executable, *script] if world == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *script]  # fmt: skip
            print(f"{world} process(es) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            results.append(json.loads(out.read_text()) | {"wall_s": round(time.perf_counter() - start, 1)})
    cpus = os.cpu_count()
    report = {"machine": machine, "cpus": cpus, "threads_per_process": 1, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(report, Path(args.out).with_suffix(".png"))
    print(f"CPU {machine['model']} ({', '.join(machine['flags'])}), {cpus} cores, 1 thread per process; "
          f"memory {results[0]['tokens']} tokens (SmolLM2, bfloat16)\n")  # fmt: skip
    print("| processes | decode ms/token: no memory / block memory / token retrieval | first token ms: no memory / "
          "block memory / token retrieval | token retrieval: bytes sent per token and layer, collectives per token, "
          "ms in collectives per token | block memory: bytes sent per question and layer | one all_gather alone (us) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        nm, bm, tr = r["no memory"], r["block memory"], r["token retrieval"]
        print(f"| {r['world']} | {nm['ms']:.1f} / {bm['ms']:.1f} / {tr['ms']:.1f} | {nm['first_token_ms']:.0f} / "
              f"{bm['first_token_ms']:.0f} / {tr['first_token_ms']:.0f} | {tr.get('bytes_per_token_layer', 0):.0f} B, "
              f"{tr.get('collectives_per_token', 0):.0f}, {tr.get('collective_ms_per_token', 0):.1f} ms | "
              f"{bm.get('prompt_bytes_per_layer', 0):.0f} B | {r.get('all_gather_us', 0):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
