"""Does the top citation cover the fact the answer needed? Attention probability vs probability x value norm.

    python benchmarks/citation_quality.py --threads 2 --out runs/citations

Same items as benchmarks/choose_defaults.py (passkeys at 4k/12k tokens, counterfactual QA on the bundled article),
default retrieval settings. An item counts when the top citation's text contains the expected answer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from choose_defaults import correct, passkey_items, qa_items
from tqdm import tqdm

from extended_mind import ExtendedMind
from extended_mind.mind import CITATION_WEIGHTINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/citations"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    rows = []
    for item in tqdm(passkey_items(random.Random(args.seed)) + qa_items(), desc="items"):
        memory = mind.memorize(item["doc"], progress=False)
        for weighting in CITATION_WEIGHTINGS:
            result = mind.generate(
                item["question"],
                memory=memory,
                chat=item["chat"],
                max_new_tokens=16,
                stop=None if item["chat"] else ["\n"],
                citation_weighting=weighting,
            )
            top = result.citations[0].text if result.citations else ""
            rows.append(
                dict(
                    task=item["task"],
                    weighting=weighting,
                    expect=item["expect"],
                    answer=result.text,
                    answer_correct=correct(item, result.text),
                    top_citation=top,
                    top_citation_has_answer=item["expect"] in top,
                )
            )
    summary = {w: sum(r["top_citation_has_answer"] for r in rows if r["weighting"] == w) for w in CITATION_WEIGHTINGS}
    n = len(rows) // len(CITATION_WEIGHTINGS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"items": n, "top_citation_has_answer": summary, "rows": rows}, indent=2)
    )
    for w, hits in summary.items():
        print(f"{w}: top citation contains the answer in {hits}/{n} items")


if __name__ == "__main__":
    main()
