"""Measure position policy x top-k x ranking on retrieval tasks, to choose the library's defaults.

    python benchmarks/choose_defaults.py --threads 2 --out runs/defaults

Tasks (SmolLM2-135M-Instruct, the question alone in the prompt, the document only in memory):
  - passkey: filler of 4k and 12k tokens (12k is beyond the model's 8k window) with a 5-digit key at depths
    0.1 / 0.5 / 0.9; chat question "What is the pass key?"; correct when the key is the first number answered;
  - counterfactual QA: the bundled Wikipedia article "Aardwolf" with one fact changed per item (the model's prior
    is no help), completion-style prompt; correct when the changed fact appears in the answer's first line.
  - unrelated questions (general knowledge) asked with the Aardwolf memory attached: correct when the expected
    word is in the answer; measures whether memory hijacks answers it has nothing to do with.
For every item we also report the log-probability of the answer under teacher forcing (higher is better), which
separates settings that greedy accuracy ties.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import statistics
from importlib.resources import files
from pathlib import Path

import torch
from tqdm import tqdm

from extended_mind import ExtendedMind
from extended_mind.bench.synthetic import PASSKEY_FILLER

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

FILLER = PASSKEY_FILLER + " "
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


UNRELATED = [
    ("What is the capital of Italy?", "The capital of Italy is", "Rome"),
    ("Which planet is the largest in the solar system?", "The largest planet is", "Jupiter"),
    ("What color is the sky on a clear day?", "The sky is", "blue"),
    ("How many legs does a spider have?", "A spider has", "eight"),
]


def unrelated_items() -> list[dict]:
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()
    return [
        dict(
            task="unrelated",
            length=None,
            depth=None,
            doc=article,
            question=question,
            chat=True,
            prefix=prefix,
            answer=f" {answer}",
            expect=answer,
        )
        for question, prefix, answer in UNRELATED
    ]


def correct(item: dict, text: str) -> bool:
    if item["task"] == "unrelated":
        return item["expect"].lower() in text.lower() or (item["expect"] == "eight" and "8" in text)
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
    parser.add_argument(
        "--first-layers", type=int, nargs="+", default=[0], help="first layer that reads memory (earlier ones do not)"
    )
    parser.add_argument("--depths", type=int, default=3, help="passkey depths per length, evenly from 0.1 to 0.9")
    parser.add_argument("--out", type=Path, default=Path("runs/defaults"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    items = passkey_items(random.Random(args.seed), args.depths) + qa_items() + unrelated_items()
    memories: dict[str, object] = {}
    for item in tqdm(items, desc="memorizing"):
        if item["doc"] not in memories:
            memories[item["doc"]] = mind.memorize(item["doc"], progress=False)
        item["memory"] = memories[item["doc"]]
    n_layers = mind.model.config.num_hidden_layers
    grid = list(itertools.product(args.policies, args.topk, args.rankings, args.first_layers))
    rows = []
    for (policy, k, ranking, first), item in tqdm(list(itertools.product(grid, items)), desc="evaluating"):
        layers = list(range(first, n_layers)) if first else None
        settings = dict(topk=k, position_policy=policy, ranking=ranking, memory_layers=layers)
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
                first_memory_layer=first,
                **{k: v for k, v in settings.items() if k != "memory_layers"},
            )
        )
    summary = []
    for policy, k, ranking, first in grid:
        key = (policy, k, ranking, first)
        sel = [r for r in rows if (r["position_policy"], r["topk"], r["ranking"], r["first_memory_layer"]) == key]
        by = {t: [r for r in sel if r["task"] == t] for t in ("passkey", "counterfactual_qa", "unrelated")}
        summary.append(
            dict(
                position_policy=policy,
                topk=k,
                ranking=ranking,
                first_memory_layer=first,
                passkey_acc=statistics.mean(r["correct"] for r in by["passkey"]),
                qa_acc=statistics.mean(r["correct"] for r in by["counterfactual_qa"]),
                unrelated_acc=statistics.mean(r["correct"] for r in by["unrelated"]),
                mean_logprob=statistics.mean(r["logprob"] for r in sel),
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "items": rows}, indent=2))
    lines = [
        "| policy | top-k | ranking | first memory layer | passkey acc | counterfactual QA acc | unrelated acc "
        "| mean answer log p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(
        summary, key=lambda s: (-(s["passkey_acc"] + s["qa_acc"] + s["unrelated_acc"]), -s["mean_logprob"])
    ):
        lines.append(
            f"| {s['position_policy']} | {s['topk']} | {s['ranking']} | {s['first_memory_layer']} | "
            f"{s['passkey_acc']:.2f} | {s['qa_acc']:.2f} | {s['unrelated_acc']:.2f} | {s['mean_logprob']:.2f} |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(summary, args.out / "defaults.png", n_passkey=sum(i["task"] == "passkey" for i in items), n_qa=len(EDITS))


def plot(summary: list[dict], path: Path, n_passkey: int, n_qa: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = sorted({(s["position_policy"], s["ranking"], s["first_memory_layer"]) for s in summary})
    for (policy, ranking, first), marker in zip(groups, "osD^v<>*xP"):
        sel = sorted(
            (
                s
                for s in summary
                if (s["position_policy"], s["ranking"], s["first_memory_layer"]) == (policy, ranking, first)
            ),
            key=lambda s: s["topk"],
        )
        label = f"{policy}/{ranking}" + (f"/layers {first}+" if first else "")
        ks = [s["topk"] for s in sel]
        axes[0].plot(
            ks,
            [(s["passkey_acc"] * n_passkey + s["qa_acc"] * n_qa) / (n_passkey + n_qa) for s in sel],
            marker=marker,
            label=label,
        )
        axes[1].plot(ks, [s["mean_logprob"] for s in sel], marker=marker, label=label)
    axes[0].set(xlabel="top-k", ylabel="accuracy (all items)", title="Greedy accuracy", xscale="log")
    axes[1].set(xlabel="top-k", ylabel="mean log p(answer)", title="Answer log-probability", xscale="log")
    for ax in axes:
        ax.set_xticks(sorted({s["topk"] for s in summary}), [str(k) for k in sorted({s["topk"] for s in summary})])
        ax.minorticks_off()
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: position policy x top-k x ranking x memory layers (passkey, counterfactual QA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
