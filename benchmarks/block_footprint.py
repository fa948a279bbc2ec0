"""Peak RSS and first-question time of block memory (the default) over a large memory.

    python benchmarks/block_footprint.py --tokens 262144

Memorizes 16k tokens of Python's documentation (bfloat16) and tiles it to `--tokens` (documents repeated under new
ids; the tiles share their stored tensors, so the stored memory itself stays small), then answers one question
(8 tokens) and prints peak RSS before and after it, the time of that first question (which prepares the memory),
the 500-token prefill and the decode speed, with the CPU model and flags. 1 thread.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from speed import decode_ms, prefill_ms, real_documents, tiled

from extended_mind import ExtendedMind
from extended_mind.retrieval.scan_select import scan_report

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=262144)
    args = ap.parse_args()
    torch.set_num_threads(1)
    mind = ExtendedMind.from_pretrained()
    memory = tiled(mind.memorize(real_documents(mind.tokenizer, 16384), storage="bfloat16", progress=False),
                   args.tokens)  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = mind.generate("Explain what the yield statement does in a function.", memory=memory, max_new_tokens=8)
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine = scan_report()["machine"]
    print(f"CPU {machine['model']} ({', '.join(machine['flags'])}), 1 thread; {memory.num_tokens} memory tokens")
    print(f"peak RSS before the first question {before:.0f} MB, after {peak:.0f} MB; first question {first:.1f} s; "
          f"prefill 500 tokens {prefill_ms(mind, memory, 2):.0f} ms; decode {decode_ms(mind, memory, 8, 2)[0]:.0f} "
          f"ms/token; answer {result.text[:60]!r}")  # fmt: skip


if __name__ == "__main__":
    main()
