"""General questions and questions about it, asked over one short article in memory (the demo's, 2,518 tokens: it fits
the window, so `whole` decides whether a question that draws no block reads it whole), chat and completion forms:

    python benchmarks/article_questions.py --threads 2 --out docs/eval-forms/article

For each form: the plain model, then the memory with each `whole` setting. General questions (the harness's 40,
bench/general.py): how many of those the plain model answers right stay right, and how many were read whole. Topic
questions (about aardwolves): how many are right and read whole. Writes results.jsonl (every answer) and
results.json (the tallies, with the CPU model and flags).
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import torch

from extended_mind import ExtendedMind
from extended_mind.base.machine import cpu_info
from extended_mind.bench.general import QUESTIONS
from extended_mind.bench.items import score_any

TOPIC = [
    ("What is an aardwolf?", ["hyena", "insectivorous", "termites", "mammal"]),
    ("Where does the aardwolf live?", ["africa"]),
    ("What does the aardwolf eat?", ["termites", "insects"]),
    ("When is the aardwolf active?", ["night", "nocturnal"]),
    ("What family does the aardwolf belong to?", ["hyaenidae", "hyena"]),
    ("What is the main food of the aardwolf?", ["termites"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per answer")
    parser.add_argument("--whole", nargs="+", default=["never", "unread"])
    parser.add_argument("--out", type=Path, default=Path("runs/article"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mind = ExtendedMind.from_pretrained(dtype="float32")
    memory = mind.memorize((files("extended_mind") / "data" / "aardwolf.txt").read_text(encoding="utf-8"),
                           progress=False)  # fmt: skip
    items = [(q, a, False) for q, _, a in QUESTIONS] + [(q, a, True) for q, a in TOPIC]
    tallies = {}
    with open(args.out / "results.jsonl", "w") as rows:
        for chat in (True, False):
            form = "chat" if chat else "completion"
            tally = {"known": 0, "topic_plain": 0} | {
                f"{k}_{w}": 0 for w in args.whole for k in ("kept", "general_whole", "topic", "topic_whole")
            }
            for n, (question, answers, topic) in enumerate(items, 1):
                prompt = question if chat else f"Question: {question}\nAnswer:"
                plain = mind.generate(prompt, chat=chat, max_new_tokens=args.tokens).text
                row = {"form": form, "question": question, "topic": topic, "plain": plain}
                right = score_any(plain, answers)
                tally["topic_plain" if topic else "known"] += right
                for whole in args.whole:
                    r = mind.generate(prompt, memory=memory, whole=whole, chat=chat, max_new_tokens=args.tokens)
                    read_whole = r.blocks_read * 64 >= memory.num_tokens  # every block of the default size
                    row[whole] = {"text": r.text, "blocks_read": r.blocks_read, "right": score_any(r.text, answers)}
                    if topic:
                        tally[f"topic_{whole}"] += row[whole]["right"]
                        tally[f"topic_whole_{whole}"] += read_whole
                    else:
                        tally[f"kept_{whole}"] += right * row[whole]["right"]
                        tally[f"general_whole_{whole}"] += read_whole
                rows.write(json.dumps(row) + "\n")
                print(f"{form} {n}/{len(items)}", flush=True)
            tallies[form] = tally
            print(form, tally, flush=True)
    cpu = cpu_info()
    (args.out / "results.json").write_text(json.dumps({"tallies": tallies, "questions": len(QUESTIONS),
                                                       "topic_questions": len(TOPIC), "memory_tokens":
                                                       memory.num_tokens, "cpu": cpu}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
