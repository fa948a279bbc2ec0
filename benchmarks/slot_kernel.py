"""Decode reading 8 memory blocks with the compiled slot step (kernels/slot_attend.cpp) against its torch
operations, and the no-memory model, in one process:

    EXTENDED_MIND_DTYPE=int4 python benchmarks/slot_kernel.py --threads 1 2 --tokens 16384 --rounds 3

Memorizes `--tokens` of Python's documentation (as benchmarks/speed.py does), then per thread count runs `--rounds`
rounds of: no memory, memory with the kernel, memory with the torch operations (each `decode_ms`: 2 runs of 16 tokens,
end of sequence banned, `block_relevance=0` so every question reads 8 blocks). Prints ms per token and the ratios to
no memory per round, with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import os

import torch
from speed import decode_ms, real_documents

from extended_mind import ExtendedMind
from extended_mind.attention import slot_step
from extended_mind.base.machine import cpu_info

os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mind = ExtendedMind.from_pretrained()
    memory = mind.memorize(real_documents(mind.tokenizer, args.tokens), storage="bfloat16", progress=False)
    cpu = cpu_info()
    print(f"CPU {cpu['model']} ({', '.join(cpu['flags'])}); weights {mind.weights}; memory {memory.num_tokens} tokens")
    kernel = slot_step.fused_kernel()
    if kernel is None:
        raise SystemExit("the slot kernel is not built here, or timed slower than the torch operations")
    print("| threads | round | no memory ms/token | kernel ms/token (x) | torch operations ms/token (x) |")
    print("| --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        mind.stream("x", memory=memory, max_new_tokens=1, block_relevance=0.0)
        for r in range(args.rounds):
            none = decode_ms(mind, None, 16, 2)[0]
            times = {}
            for name, chosen in (("kernel", kernel), ("torch", None)):
                slot_step.fused_kernel = lambda chosen=chosen: chosen
                times[name] = decode_ms(mind, memory, 16, 2, block_relevance=0.0)[0]
            slot_step.fused_kernel = lambda: kernel
            print(f"| {threads} | {r + 1} | {none:.1f} | {times['kernel']:.1f} ({times['kernel'] / none:.2f}) | "
                  f"{times['torch']:.1f} ({times['torch'] / none:.2f}) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
