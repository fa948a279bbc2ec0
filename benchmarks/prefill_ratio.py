"""Prefill and decode with memory against the no-memory model, for block memory (the default) and token retrieval.

    python benchmarks/prefill_ratio.py --threads 1 --tokens 65536

Memorizes `--tokens` of Python's documentation (as benchmarks/speed.py does), then times a 500-token prompt's
prefill (median of 3) and decode (median ms per token over 2 runs of 8 tokens) with no memory, with block memory
and with exact token retrieval, and prints the ratios with the CPU model, its flags and the exact-scan path chosen
(block memory's rows say how many blocks the decode runs' two questions read: with the default relevance test these
documentation questions may read none, i.e. time the plain model, so a second row reads with the test off; a third
times that row again with the slot step's torch operations instead of its compiled kernel, attention/slot_step.py).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from speed import PROMPTS, decode_ms, prefill_ms, real_documents

from extended_mind import ExtendedMind
from extended_mind.attention import slot_step
from extended_mind.retrieval.scan_select import kernels, scan_report

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    print(f"weights: {mind.weights}")
    start = time.perf_counter()
    memory = mind.memorize(real_documents(mind.tokenizer, args.tokens), storage="bfloat16", progress=False)
    scan = scan_report()
    print(f"CPU {scan['machine']['model']} ({', '.join(scan['machine']['flags'])}), {args.threads} thread(s), exact "
          f"scan {scan['choice']} (kernels per call: {kernels(scan)}); memory {memory.num_tokens} tokens, memorized in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    base_prefill = prefill_ms(mind, None, 3)
    base_decode, _ = decode_ms(mind, None, 8, 2)
    print(f"| method | prefill 500 tokens ms (x) | decode ms/token (x) |\n| --- | --- | --- |\n"
          f"| no memory | {base_prefill:.0f} | {base_decode:.0f} |")  # fmt: skip
    # block memory reads nothing for a question no block is relevant to (then it is the plain model): its row is
    # timed with the relevance test off, so the blocks are read; the default's row says what it read
    fused = slot_step.fused_kernel()  # the compiled slot step, where built and timed faster here
    for label, options in (("block memory (default)", {}), ("block memory, blocks read (block_relevance=0)",
                                                            {"block_relevance": 0.0}),
                           ("same, eager step, slots read by torch operations", {"block_relevance": 0.0,
                                                                                      "kernel": False}),
                           ("token retrieval, exact", {"retrieval": "tokens", "search": "exact"})):  # fmt: skip
        if options.pop("kernel", True) is False:
            if fused is None:
                continue
            slot_step.fused_kernel = lambda: None
        mind.stream("x", memory=memory, max_new_tokens=1, **options)  # prepares the memory once
        prefill = prefill_ms(mind, memory, 3, **options)
        decode, _ = decode_ms(mind, memory, 8, 2, **options)
        slot_step.fused_kernel = lambda: fused
        read = [mind.generate(p, memory=memory, max_new_tokens=1, **options).blocks_read for p in PROMPTS[:2]]
        blocks = "" if read[0] is None else f" (blocks read by the decode runs' questions: {read})"
        print(f"| {label}{blocks} | {prefill:.0f} ({prefill / base_prefill:.2f}) | {decode:.0f} "
              f"({decode / base_decode:.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
