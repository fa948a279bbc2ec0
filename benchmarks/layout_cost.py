"""What the layout of the chosen blocks (engine/layouts.py) costs a chat answer that reads memory blocks.

    python benchmarks/layout_cost.py --threads 2 --new-tokens 16 64 --repeats 3 --out runs/layout-cost
    python benchmarks/layout_cost.py --threads 2 --new-tokens 16 64 --repeats 3 --batched --out runs/layout-cost-batched
    python benchmarks/layout_cost.py --threads 2 --new-tokens 16 64 --repeats 3 --layouts never surer question
    python benchmarks/layout_cost.py --threads 2 --new-tokens 16 64 --repeats 3 --layouts auto:quote_threshold=0 auto

The demo's article in memory (SmolLM2, the weights `auto` picks), questions that read blocks, asked in chat form
with `block_break="never"` (the slots glued to the question: no choice made) and the default (`auto`, which is
`question` for these answers: the blocks' keys and values computed again after the question, in one pass, then the
question asked again); `surer`: the slots glued, after a blank line, and the article read whole, since it fits the
window, answer up to 16 greedy tokens each, a trial stopping once it cannot win; the surest is kept and a greedy
answer goes on from it. Every answer is exactly
`--new-tokens` long (end of sequence banned with logit_bias); seconds per answer are medians over `--repeats` runs
taken in turn. `--batched`: each answer is a batch of one row (`generate_batch`, the server's decode loop,
engine/batching.py) instead of a single answer. `--layouts`: the block_break values timed (default: never, auto),
each compared with the first; a value may carry numeric options after a colon (`auto:quote_threshold=0`).
Writes results.json and table.md, with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.resources import files
from pathlib import Path

import torch

from extended_mind import ExtendedMind
from extended_mind.base.machine import cpu_info

# two that read chosen blocks (the choice is made) and one that reads nothing (no choice: no cost)
QUESTIONS = [
    "How many termites can one aardwolf eat in a single night?",
    "What is the aardwolf called in Afrikaans?",
    "What does the aardwolf use to capture termites?",
]


def layout_options(layout: str) -> dict:
    """The options a `--layouts` value names: auto:quote_threshold=0 -> block_break auto, quote_threshold 0."""
    block_break, _, rest = layout.partition(":")
    pairs = [p.split("=", 1) for p in rest.split(",") if p]
    return {"block_break": block_break, **{k: float(v) for k, v in pairs}}


def seconds(mind: ExtendedMind, memory, question: str, new_tokens: int, layout: str, batched: bool
            ) -> tuple[float, int]:  # fmt: skip
    options = dict(max_new_tokens=new_tokens, logit_bias={mind.tokenizer.eos_token_id: -100.0},
                   **layout_options(layout))  # fmt: skip
    start = time.perf_counter()
    if batched:
        [result] = mind.generate_batch([question], [memory], **options)
    else:
        result = mind.generate(question, memory=memory, **options)
    assert len(result.tokens) == new_tokens, "an answer stopped early: its time would not compare"
    return time.perf_counter() - start, int(result.blocks_read or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched", action="store_true", help="answer as a batch of one row (the server's path)")
    parser.add_argument("--layouts", nargs="+", default=["never", "auto"],
                        help="block_break values, timed in turn; each compared with the first")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/layout-cost"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags'])}; torch {torch.__version__}", flush=True)
    mind = ExtendedMind.from_pretrained()
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()
    memory = mind.memorize(article, progress=False)
    rows = []
    for n in args.new_tokens:
        for question in QUESTIONS:
            times: dict[str, list[float]] = {layout: [] for layout in args.layouts}
            # warm-up (the calibrations, the native step's timing)
            for layout in times:
                seconds(mind, memory, question, n, layout, args.batched)
            for _ in range(args.repeats):
                for layout in times:
                    t, read = seconds(mind, memory, question, n, layout, args.batched)
                    times[layout].append(t)
            medians = {layout: statistics.median(ts) for layout, ts in times.items()}
            base = medians[args.layouts[0]]
            rows.append({"question": question, "new_tokens": n, "blocks_read": read,
                         **{f"{layout}_s": m for layout, m in medians.items()},
                         **{f"{layout}_ratio": m / base for layout, m in medians.items()}})  # fmt: skip
            print(f"{n} tokens, {question!r}: " + ", ".join(f"{k} {m:.3f} s ({m / base:.2f}x)"
                                                          for k, m in medians.items()), flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "weights": mind.weights,
            "repeats": args.repeats, "batched": args.batched, "rows": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(info, indent=1))
    lines = [
        f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}); {args.threads} threads; weights {mind.weights}; "
        f"medians of {args.repeats}; {'batches of one row' if args.batched else 'single answers'}",
        "",
        "| new tokens | question | blocks read | "
        + " | ".join(f"{k} (s)" for k in args.layouts)
        + " | "
        + " | ".join(f"{k} / {args.layouts[0]}" for k in args.layouts[1:])
        + " |",
        "|---|---|---|" + "---|" * (2 * len(args.layouts) - 1),
    ]
    lines += [f"| {r['new_tokens']} | {r['question']} | {r['blocks_read']} | "
              + " | ".join(f"{r[k + '_s']:.3f}" for k in args.layouts) + " | "
              + " | ".join(f"{r[k + '_ratio']:.2f}x" for k in args.layouts[1:]) + " |" for r in rows]  # fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
