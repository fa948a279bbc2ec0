"""Chunked prefill: how long running streams stall when a long prompt joins them (SmolLM2, fixed threads).

    python benchmarks/chunked_prefill.py --threads 2 --chunks 0 64 128 256 --out runs/chunked_prefill

`--running` short completion prompts decode together (continuous batching, engine/batching.py); after 4 steps a
prompt of `--long` tokens (Python's documentation) joins them. With `prefill_chunk` 0 the whole prompt is prefilled
in one pass before the next decode step; with a chunk of C tokens, C tokens are prefilled before each decode step
until the prompt is in. Reported per chunk size (medians over `--repeats`): the running streams' longest gap
between two tokens, their 99th-percentile gap, the joining prompt's time to its first token and the wall time of
the whole run, and whether every stream's tokens equal the unchunked run's. End-of-sequence is banned, so every
stream decodes exactly its token budget. Writes results.json, table.md and chunked_prefill.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import statistics
import time
from pathlib import Path

import torch

from extended_mind import ExtendedMind
from extended_mind.base.machine import cpu_info
from extended_mind.engine.batching import BatchRow, DecodeBatch

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

SHORT = ["The capital of France is", "A list of prime numbers: 2, 3,", "Water boils at", "The first month is"]


def one_run(mind: ExtendedMind, chunk: int, args: argparse.Namespace) -> dict:
    """Decode the running prompts, join the long one after 4 steps; gaps and tokens per stream."""
    ban = {int(mind.tokenizer.eos_token_id): -100.0}
    text = " ".join(pydoc_data.topics.topics["class"].split())
    long_ids = mind.tokenizer(text)["input_ids"][: args.long]
    batch = DecodeBatch(mind.model, mind.tokenizer, max_batch=args.running + 1, prefill_chunk=chunk or None)
    times: list[list[float]] = [[] for _ in range(args.running + 1)]
    tokens: list[list[int]] = [[] for _ in range(args.running + 1)]

    def sink(i: int):
        def take(item) -> None:
            if hasattr(item, "id"):
                times[i].append(time.perf_counter())
                tokens[i].append(item.id)

        return take

    start = time.perf_counter()
    for i, prompt in enumerate(SHORT[: args.running]):
        stream = mind.stream(prompt, chat=False, max_new_tokens=args.tokens, logit_bias=ban)
        batch.join(BatchRow.of(stream), stream.settings, sink(i), lambda: False)
    for _ in range(4):
        batch.step()
    stream = mind.stream(long_ids, chat=False, max_new_tokens=8, logit_bias=ban)
    joined = time.perf_counter()
    batch.join(BatchRow.of(stream), stream.settings, sink(args.running), lambda: False)
    while len(batch):
        batch.step()
    wall = time.perf_counter() - start
    gaps = [b - a for ts in times[: args.running] for a, b in zip(ts, ts[1:])]
    gaps.sort()
    return {"max_gap_s": gaps[-1], "p99_gap_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "median_gap_s": statistics.median(gaps), "join_first_token_s": times[-1][0] - joined, "wall_s": wall,
            "tokens": tokens}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256], help="0: the whole prompt at once")
    ap.add_argument("--running", type=int, default=4, help="streams decoding when the long prompt joins (at most 4)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens each running stream decodes")
    ap.add_argument("--long", type=int, default=1536, help="tokens of the joining prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/chunked_prefill"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mind = ExtendedMind.from_pretrained()
    cpu = cpu_info()
    print(f"CPU {cpu['model']} ({', '.join(cpu['flags'])}), {args.threads} thread(s)", flush=True)
    one_run(mind, 0, argparse.Namespace(**{**vars(args), "long": 64, "tokens": 4}))  # warm-up
    rows, reference = [], None
    chunks = sorted(set(args.chunks))  # 0 (the whole prompt) first: the tokens every other run must give
    for repeat in range(args.repeats):
        for chunk in chunks:
            run = one_run(mind, chunk, args)
            reference = reference or run["tokens"]
            run["equal_to_unchunked"] = run["tokens"] == reference
            rows.append({"chunk": chunk, "repeat": repeat, **{k: v for k, v in run.items() if k != "tokens"}})
            print(rows[-1], flush=True)
    table = []
    for chunk in chunks:
        runs = [r for r in rows if r["chunk"] == chunk]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
        table.append({"chunk": chunk, **med, "equal": all(r["equal_to_unchunked"] for r in runs)})
    results = {"cpu": cpu, "threads": args.threads, "running": args.running, "tokens": args.tokens,
               "long": args.long, "repeats": args.repeats, "runs": rows, "table": table}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"CPU {cpu['model']} ({', '.join(cpu['flags'])}), {args.threads} thread(s); {args.running} streams of "
             f"{args.tokens} tokens running, a {args.long}-token prompt joins after 4 steps; medians of "
             f"{args.repeats} runs.", "",
             "| prefill chunk | longest gap s | p99 gap s | median gap s | joiner's first token s | wall s | "
             "tokens equal to unchunked |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in table:
        lines.append(f"| {r['chunk'] or 'whole prompt'} | {r['max_gap_s']:.2f} | {r['p99_gap_s']:.2f} | "
                     f"{r['median_gap_s']:.3f} | {r['join_first_token_s']:.2f} | {r['wall_s']:.1f} | "
                     f"{'yes' if r['equal'] else 'no'} |")  # fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, args.out)


def plot(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["chunk"] or "whole") for r in table]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], [r["max_gap_s"] for r in table], 0.4, label="running streams' longest gap")
    ax.bar([i + 0.2 for i in x], [r["join_first_token_s"] for r in table], 0.4, label="joining prompt's first token")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("prefill chunk (tokens)")
    ax.set_ylabel("seconds")
    ax.set_title("A long prompt joining running streams")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "chunked_prefill.png", dpi=120)


if __name__ == "__main__":
    main()
