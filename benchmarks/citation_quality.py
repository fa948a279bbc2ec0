"""Does the top citation cover the fact the answer needed? Per position policy, attention probability vs
probability x value norm.

    python benchmarks/citation_quality.py --threads 2 --topk 5 --out runs/citations

Same items as benchmarks/choose_defaults.py (passkeys at 4k/12k tokens, counterfactual QA on the bundled article).
An item counts when the top citation's text contains the expected answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from pathlib import Path

import torch
from choose_defaults import correct, passkey_items, qa_items
from tqdm import tqdm

from extended_mind import ExtendedMind
from extended_mind.engine.options import CITATION_WEIGHTINGS

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--policies", nargs="+", default=["zero", "stored"])
    parser.add_argument("--out", type=Path, default=Path("runs/citations"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    rows = []
    for item in tqdm(passkey_items(random.Random(args.seed)) + qa_items(), desc="items"):
        memory = mind.memorize(item["doc"], progress=False)
        for policy, weighting in itertools.product(args.policies, CITATION_WEIGHTINGS):
            result = mind.generate(
                item["question"],
                memory=memory,
                chat=item["chat"],
                max_new_tokens=16,
                stop=None if item["chat"] else ["\n"],
                citation_weighting=weighting,
                position_policy=policy,
                topk=args.topk,
            )
            top = result.citations[0].text if result.citations else ""
            rows.append(
                dict(
                    task=item["task"],
                    position_policy=policy,
                    weighting=weighting,
                    expect=item["expect"],
                    answer=result.text,
                    answer_correct=correct(item, result.text),
                    top_citation=top,
                    top_citation_has_answer=item["expect"] in top,
                )
            )
    summary = []
    for policy, weighting in itertools.product(args.policies, CITATION_WEIGHTINGS):
        sel = [r for r in rows if r["position_policy"] == policy and r["weighting"] == weighting]
        summary.append(
            dict(
                position_policy=policy,
                weighting=weighting,
                items=len(sel),
                answer_correct=sum(r["answer_correct"] for r in sel),
                top_citation_has_answer=sum(r["top_citation_has_answer"] for r in sel),
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"topk": args.topk, "summary": summary, "rows": rows}, indent=2))
    for s in summary:
        print(
            f"{s['position_policy']:>6} {s['weighting']:>15}: answer correct {s['answer_correct']}/{s['items']}, "
            f"top citation contains the answer {s['top_citation_has_answer']}/{s['items']}"
        )


if __name__ == "__main__":
    main()
