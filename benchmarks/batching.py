"""Batched generation with a memory per prompt against the same prompts one by one (SmolLM2, fixed threads).

    python benchmarks/batching.py --threads 1 --batch 8 --tokens 16 --out runs/batching

Memories: Python's documentation (`pydoc_data.topics`), one per prompt (the first 8,000 characters of one of the
longest topics, about 2,000 tokens); every fourth prompt has none. Reports the wall time of both ways (median of
repeats), the speed-up, and how many prompts got the same tokens both ways.
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

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

TOPICS = sorted(pydoc_data.topics.topics, key=lambda t: -len(pydoc_data.topics.topics[t]))[:16]  # the longest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/batching"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mind = ExtendedMind.from_pretrained()
    topics = [TOPICS[i % len(TOPICS)] for i in range(args.batch)]
    memories = [
        None if i % 4 == 3 else mind.memorize(pydoc_data.topics.topics[t][:8000], progress=False)
        for i, t in enumerate(topics)
    ]
    prompts = [f"Question: What does the Python documentation say about '{t}'?\nAnswer: It says that" for t in topics]
    options = dict(max_new_tokens=args.tokens, chat=False)
    mind.generate_batch(prompts[:2], memories[:2], **options)  # warm-up: prepares the memories' keys

    def one_by_one():
        return [mind.generate(p, memory=m, **options) for p, m in zip(prompts, memories)]

    def batched():
        return mind.generate_batch(prompts, memories, **options)

    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    same = sum([t.id for t in a.tokens] == [t.id for t in b.tokens] for a, b in zip(*outputs.values()))
    result = {
        "threads": args.threads,
        "batch": args.batch,
        "tokens": args.tokens,
        "memory_tokens": [m.num_tokens if m else 0 for m in memories],
        "one_by_one_s": statistics.median(times["one_by_one"]),
        "batched_s": statistics.median(times["batched"]),
        "same_tokens": f"{same}/{args.batch}",
    }
    result["speedup"] = result["one_by_one_s"] / result["batched_s"]
    result["answers"] = [r.text for r in outputs["batched"]]
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}, indent=1))


if __name__ == "__main__":
    main()
