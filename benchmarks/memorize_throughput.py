"""Memorization throughput against plain forward passes over the same tokens (one run, medians, fixed threads).

    python benchmarks/memorize_throughput.py --tokens 8192 --repeats 3 --threads 2 --out runs/throughput

Baselines, both over the same tokens cut into consecutive, non-overlapping windows of the memorization window:
  - `forward`: model(ids), what a user runs to read a text once (with the LM head);
  - `decoder`: the decoder stack alone, without the LM head (memorization skips the head too; the strict baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from extended_mind import ExtendedMind

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    text = FILLER * (args.tokens // 24 + 1)
    ids = mind.tokenizer(text)["input_ids"][: args.tokens]
    text = mind.tokenizer.decode(ids)
    n = len(mind.tokenizer(text)["input_ids"])
    windows = [torch.tensor([ids[i : i + args.window]]) for i in range(0, len(ids), args.window)]

    def plain(model):
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w)

    t_mem = timed(lambda: mind.memorize(text, stride=args.stride, window=args.window, progress=False), args.repeats)
    t_fwd = timed(lambda: plain(mind.model), args.repeats)
    t_dec = timed(lambda: plain(mind.model.base_model), args.repeats)
    result = {
        "tokens": n,
        "window": args.window,
        "stride": args.stride,
        "threads": args.threads,
        "repeats": args.repeats,
        "memorize_tok_per_s": n / t_mem,
        "forward_tok_per_s": len(ids) / t_fwd,
        "decoder_tok_per_s": len(ids) / t_dec,
        "ratio_vs_forward": (n / t_mem) / (len(ids) / t_fwd),
        "ratio_vs_decoder": (n / t_mem) / (len(ids) / t_dec),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
