"""Decode reading 8 memory blocks against the no-memory model, in one process: with the native decode step
(engine/fast_step.py, the default where it applies: the whole step in C++, slots read by kernels/slot_attend.cpp),
and with the model's own forward (eager), its slots read by the compiled slot step or by its torch operations:

    EXTENDED_MIND_DTYPE=int4 python benchmarks/slot_kernel.py --threads 1 2 --tokens 16384 --rounds 3

Memorizes `--tokens` of Python's documentation (as benchmarks/speed.py does), then per thread count runs `--rounds`
rounds of: native no memory and memory; eager no memory, memory with the slot kernel, memory with the torch
operations (each `decode_ms`: 2 runs of 16 tokens, end of sequence banned, `block_relevance=0` so every question
reads 8 blocks). Prints ms per token and the ratios to no memory of the same path per round, with the CPU model and
flags.
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
    kernel, native = slot_step.fused_kernel(), mind.decode_step
    if kernel is None or native is None:
        raise SystemExit("the slot kernel or the native step is not built here, or timed slower than torch's path")
    print("| threads | round | native: no memory ms/token | native: memory ms/token (x) | eager: no memory ms/token | "
          "eager: memory, slot kernel (x) | eager: memory, torch operations (x) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        mind.stream("x", memory=memory, max_new_tokens=1, block_relevance=0.0)
        for r in range(args.rounds):
            mind.native_step = native
            t = {"native none": decode_ms(mind, None, 16, 2)[0],
                 "native": decode_ms(mind, memory, 16, 2, block_relevance=0.0)[0]}  # fmt: skip
            mind.native_step = None
            t["eager none"] = decode_ms(mind, None, 16, 2)[0]
            for name, chosen in (("kernel", kernel), ("torch", None)):
                slot_step.fused_kernel = lambda chosen=chosen: chosen
                t[name] = decode_ms(mind, memory, 16, 2, block_relevance=0.0)[0]
            slot_step.fused_kernel = lambda: kernel
            mind.native_step = native
            base = {"native": t["native none"], "kernel": t["eager none"], "torch": t["eager none"]}
            ratios = [f"{t[k]:.1f} ({t[k] / base[k]:.2f})" for k in ("native", "kernel", "torch")]
            cells = [f"{t['native none']:.1f}", ratios[0], f"{t['eager none']:.1f}", *ratios[1:]]
            print(f"| {threads} | {r + 1} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
