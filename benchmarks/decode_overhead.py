"""The framework's cost per decoded token (Python, dispatch, small ops): eager, the native step, the compiled step.

    python benchmarks/decode_overhead.py --threads 1 --new-tokens 64 --repeats 5 --out runs/overhead

A random model with SmolLM2-135M's depth and attention layout (30 layers, 9 query heads over 3 key/value heads) but
widths so small (hidden 72, head 8; SmolLM2's tokenizer and vocabulary) that its kernels take next to no time: a
decode step of it is what every step of the real model pays on top of reading the weights. Every path runs our
generation loop, timed as benchmarks/speed.py times decoding (`decode_ms`: no memory, exactly `--new-tokens`
tokens, end of sequence banned): the model's own forward (eager), the native step (engine/fast_step.py: the
decoder layers in one C++ call) and the compiled step; ms per token are medians over `--repeats` runs taken in turn
(eager, native, compiled, eager, ...) after a warm-up that also compiles. Writes results.json and prints a table
with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed import decode_ms
from transformers import AutoModelForCausalLM, LlamaConfig

from extended_mind import ExtendedMind
from extended_mind.base.loading import load_model
from extended_mind.base.machine import cpu_info
from extended_mind.engine.compiled import CompiledStep


def skinny_smollm2(vocab: int) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=vocab, hidden_size=72, intermediate_size=192, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=8192,
                         tie_word_embeddings=True)  # fmt: skip
    config.eos_token_id = None  # a random model would stop at random
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/overhead"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags'])}; torch {torch.__version__}", flush=True)
    tokenizer = load_model(None, dtype="float32")[1]  # SmolLM2's tokenizer (and vocabulary size)
    mind = ExtendedMind(skinny_smollm2(len(tokenizer)), tokenizer, "skinny-smollm2")
    step = CompiledStep(mind.model)
    start = time.perf_counter()
    mind.compiled_step = step
    decode_ms(mind, None, args.new_tokens, 1)  # compiles
    compile_s = time.perf_counter() - start
    if step.failure:
        raise SystemExit(f"the compiled step failed here: {step.failure}")
    mind.compiled_step = None
    native = mind.decode_step
    if native is None:
        raise SystemExit("the native step is not built here, or timed slower than the eager forward")
    samples: dict[str, list[float]] = {"eager": [], "native": [], "compiled": []}
    for _ in range(args.repeats):
        for path in samples:
            mind.compiled_step = step if path == "compiled" else None
            mind.native_step = native if path == "native" else None
            samples[path].append(decode_ms(mind, None, args.new_tokens, 1)[0])
    medians = {f"{k}_ms_per_token": statistics.median(v) for k, v in samples.items()}
    result = {"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "compile_s": compile_s, **medians, "samples": samples}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"| path | ms per token (framework only; {args.threads} thread(s)) |\n|---|---|\n"
          f"| eager | {result['eager_ms_per_token']:.2f} |\n| native | {result['native_ms_per_token']:.2f} |\n"
          f"| compiled | {result['compiled_ms_per_token']:.2f} |\n"
          f"compiling took {compile_s:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
