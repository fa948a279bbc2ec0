"""Measure position policy x top-k x ranking on retrieval tasks, to choose the library's defaults.

    python benchmarks/choose_defaults.py --threads 2 --out runs/defaults

Tasks (SmolLM2-135M-Instruct, the question alone in the prompt, the document only in memory):
  - passkey: filler of 4k and 12k tokens (12k is beyond the model's 8k window) with a 5-digit key at depths
    0.1 / 0.5 / 0.9; chat question "What is the pass key?"; correct when the key is the first number answered;
  - counterfactual QA: the bundled Wikipedia article "Aardwolf" with one fact changed per item (the model's prior
    is no help), completion-style prompt; correct when the changed fact appears in the answer's first line.
For every item we also report the log-probability of the answer under teacher forcing (higher is better), which
separates settings that greedy accuracy ties.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
from importlib.resources import files
from pathlib import Path

import torch
from tqdm import tqdm

from extended_mind import ExtendedMind

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# (true text, counterfactual, question, answer prefix)
EDITS = [
    ("250,000", "80,000", "How many termites can one aardwolf eat in a single night?", "One aardwolf can eat about"),
    ("earth wolf", "stone wolf", "What does the name aardwolf mean?", 'The name aardwolf means "'),
    (
        "Afrikaans and Dutch",
        "Swahili and Zulu",
        "In which languages does aardwolf mean earth wolf?",
        'The name means "earth wolf" in',
    ),
    (
        "Proteles cristata",
        "Proteles borealis",
        "What is the scientific name of the aardwolf?",
        "The scientific name of the aardwolf is",
    ),
]


def passkey_items(rng: random.Random, depths: int = 3) -> list[dict]:
    items = []
    for length, depth in itertools.product(
        [4000, 12000], [round(0.1 + 0.8 * i / max(1, depths - 1), 2) for i in range(depths)]
    ):
        key = rng.randint(10000, 99999)
        blocks = [FILLER] * (length // 24)
        blocks.insert(int(depth * len(blocks)), f"The pass key is {key}. Remember it. {key} is the pass key. ")
        items.append(
            dict(
                task="passkey",
                length=length,
                depth=depth,
                doc="".join(blocks),
                question="What is the pass key?",
                chat=True,
                prefix="The pass key is",
                answer=f" {key}",
                expect=str(key),
            )
        )
    return items


def qa_items() -> list[dict]:
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text().replace("80,000", "250,000")
    items = []
    for true, false, question, prefix in EDITS:
        assert true in article and false not in article
        items.append(
            dict(
                task="counterfactual_qa",
                length=None,
                depth=None,
                doc=article.replace(true, false),
                question=f"Question: {question}\nAnswer: {prefix}",
                chat=False,
                prefix="",
                answer=" " + false if not prefix.endswith('"') else false,
                expect=false,
            )
        )
    return items


def correct(item: dict, text: str) -> bool:
    if item["task"] == "passkey":
        numbers = re.findall(r"\d+", text)
        return bool(numbers) and numbers[0] == item["expect"]
    return item["expect"] in text.split("\n")[0]


def answer_logprob(mind: ExtendedMind, item: dict, memory, **settings) -> float:
    prompt = mind.encode_prompt(item["question"], item["chat"], item["prefix"])
    answer = mind.tokenizer(item["answer"], add_special_tokens=False)["input_ids"]
    logits = mind.logits(torch.tensor([prompt + answer]), memory, **settings)[0].float().log_softmax(-1)
    return sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topk", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--rankings", nargs="+", default=["logit", "cosine"])
    parser.add_argument("--policies", nargs="+", default=["stored", "zero"])
    parser.add_argument("--depths", type=int, default=3, help="passkey depths per length, evenly from 0.1 to 0.9")
    parser.add_argument("--out", type=Path, default=Path("runs/defaults"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    items = passkey_items(random.Random(args.seed), args.depths) + qa_items()
    for item in tqdm(items, desc="memorizing"):
        item["memory"] = mind.memorize(item["doc"], progress=False)
    grid = list(itertools.product(args.policies, args.topk, args.rankings))
    rows = []
    for (policy, k, ranking), item in tqdm(list(itertools.product(grid, items)), desc="evaluating"):
        settings = dict(topk=k, position_policy=policy, ranking=ranking)
        result = mind.generate(
            item["question"],
            memory=item["memory"],
            chat=item["chat"],
            max_new_tokens=16,
            stop=["\n"] if not item["chat"] else None,
            **settings,
        )
        rows.append(
            dict(
                task=item["task"],
                length=item["length"],
                depth=item["depth"],
                expect=item["expect"],
                prediction=result.text,
                correct=correct(item, result.text),
                logprob=answer_logprob(mind, item, item["memory"], **settings),
                **settings,
            )
        )
    summary = []
    for policy, k, ranking in grid:
        sel = [r for r in rows if (r["position_policy"], r["topk"], r["ranking"]) == (policy, k, ranking)]
        by = {t: [r for r in sel if r["task"] == t] for t in ("passkey", "counterfactual_qa")}
        summary.append(
            dict(
                position_policy=policy,
                topk=k,
                ranking=ranking,
                passkey_acc=statistics.mean(r["correct"] for r in by["passkey"]),
                qa_acc=statistics.mean(r["correct"] for r in by["counterfactual_qa"]),
                mean_logprob=statistics.mean(r["logprob"] for r in sel),
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "items": rows}, indent=2))
    lines = [
        "| policy | top-k | ranking | passkey acc | counterfactual QA acc | mean answer log p |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(summary, key=lambda s: (-(s["passkey_acc"] + s["qa_acc"]), -s["mean_logprob"])):
        lines.append(
            f"| {s['position_policy']} | {s['topk']} | {s['ranking']} | {s['passkey_acc']:.2f} | "
            f"{s['qa_acc']:.2f} | {s['mean_logprob']:.2f} |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(summary, args.out / "defaults.png", n_passkey=sum(i["task"] == "passkey" for i in items), n_qa=len(EDITS))


def plot(summary: list[dict], path: Path, n_passkey: int, n_qa: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pairs = sorted({(s["position_policy"], s["ranking"]) for s in summary})
    for (policy, ranking), marker in zip(pairs, "osD^v<>"):
        sel = sorted(
            (s for s in summary if s["position_policy"] == policy and s["ranking"] == ranking), key=lambda s: s["topk"]
        )
        ks = [s["topk"] for s in sel]
        axes[0].plot(
            ks,
            [(s["passkey_acc"] * n_passkey + s["qa_acc"] * n_qa) / (n_passkey + n_qa) for s in sel],
            marker=marker,
            label=f"{policy}/{ranking}",
        )
        axes[1].plot(ks, [s["mean_logprob"] for s in sel], marker=marker, label=f"{policy}/{ranking}")
    axes[0].set(xlabel="top-k", ylabel="accuracy (all items)", title="Greedy accuracy", xscale="log")
    axes[1].set(xlabel="top-k", ylabel="mean log p(answer)", title="Answer log-probability", xscale="log")
    for ax in axes:
        ax.set_xticks(sorted({s["topk"] for s in summary}), [str(k) for k in sorted({s["topk"] for s in summary})])
        ax.minorticks_off()
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: position policy x top-k x ranking (passkey 4k/12k + counterfactual QA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
