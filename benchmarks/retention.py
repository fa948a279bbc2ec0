"""Online knowledge updates: stream documents into one memory, one at a time, and keep asking about all of them.

    python benchmarks/retention.py --threads 2 --docs 30 --out runs/retention

Each document is a short profile of a fictional person (name, city, profession, locker number) padded with
sentences every profile shares, so retrieval has to pick the right person, not just any number. After each
checkpoint (1, 5, 10, 20, ... documents stored) every stored document is asked about (its locker number and its
city, completion-style prompts, the profile only in memory). Then a third of the documents are replaced with
edited versions (new number and city) and asked again: an answer counts when it follows the new version, and
we also record whether the top citation points into the replaced document. As a baseline the same questions are
asked with all stored documents pasted into the prompt instead (`context`, while they fit the window).

Writes results.json (every question), table.md, and retention.png (accuracy against documents stored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from extended_mind import ExtendedMind

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

FIRST = "Ada Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kaori Lars Mira Nils Olga Pavel Rosa Sven Tara Umar"
LAST = "Abbott Berger Castillo Dunmore Eklund Ferreira Gallo Haddad Ivanova Jansen Kowalski Lindqvist Moreau Novak"
CITIES = "Lisbon Oslo Krakow Porto Tallinn Ghent Bergen Lyon Turin Graz Aarhus Leipzig Bilbao Split Cork Basel".split()
JOBS = "baker surveyor violinist nurse carpenter chemist pilot librarian gardener welder tailor geologist".split()
SHARED = [
    "The building has a quiet courtyard with a fountain.",
    "Every member of the club keeps their things in a numbered locker.",
    "On weekends the club organises long walks along the river.",
    "New members receive a small welcome booklet with the house rules.",
    "The reading room is open from early morning until late evening.",
]


def make_people(n: int, rng: random.Random) -> list[dict]:
    names = [f"{f} {last}" for f in FIRST.split() for last in LAST.split()]
    rng.shuffle(names)
    if n > len(names):
        raise SystemExit(f"at most {len(names)} documents")
    return [
        {"id": f"profile-{i}", "name": names[i], "city": rng.choice(CITIES), "job": rng.choice(JOBS),
         "locker": rng.randint(100, 9999)}
        for i in range(n)
    ]  # fmt: skip


def profile_text(p: dict, rng: random.Random) -> str:
    shared = rng.sample(SHARED, len(SHARED))
    return " ".join(
        [
            f"{p['name']} is a {p['job']} who lives in {p['city']}.",
            *shared[:2],
            f"{p['name']}'s locker number is {p['locker']}.",
            *shared[2:],
            f"Friends say {p['name'].split()[0]} is always on time.",
        ]
    )


def questions(p: dict) -> list[dict]:
    name = p["name"]
    return [
        {"kind": "locker", "prompt": f"Question: What is {name}'s locker number?\nAnswer: {name}'s locker number is",
         "expect": str(p["locker"])},
        {"kind": "city", "prompt": f"Question: In which city does {name} live?\nAnswer: {name} lives in",
         "expect": p["city"]},
    ]  # fmt: skip


def score(q: dict, text: str) -> bool:
    line = text.strip().split("\n")[0]
    if q["kind"] == "locker":
        numbers = re.findall(r"\d+", line)
        return bool(numbers) and numbers[0] == q["expect"]
    return q["expect"].lower() in line.lower()


def ask(mind: ExtendedMind, memory, p: dict, stored: int, phase: str, topk: int, context: str = "") -> list[dict]:
    """Ask both questions about person `p`: from `memory`, or with `context` (documents) pasted before them."""
    rows = []
    for q in questions(p):
        t0 = time.perf_counter()
        prompt = f"{context}\n\n{q['prompt']}" if context else q["prompt"]
        mem = None if context else memory
        r = mind.generate(prompt, memory=mem, chat=False, max_new_tokens=8, stop=["\n"], topk=topk)
        top = r.citations[0].doc if r.citations else None
        rows.append(
            dict(method="context" if context else "emt", phase=phase, stored=stored, doc=p["id"], kind=q["kind"],
                 expect=q["expect"], prediction=r.text,
                 correct=score(q, r.text), top_citation=top, cites_doc=top == p["id"],
                 seconds=round(time.perf_counter() - t0, 3))
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=30)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--no-context", action="store_true", help="skip the documents-in-the-prompt baseline")
    parser.add_argument("--storage", default=None, help="float32, bfloat16, float16 or int8 (model dtype)")
    parser.add_argument("--out", type=Path, default=Path("runs/retention"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    mind = ExtendedMind.from_pretrained()
    people = make_people(args.docs, rng)
    checkpoints = sorted({n for n in (1, 5, *range(10, args.docs + 1, 10)) if n <= args.docs} | {args.docs})
    memory, rows, add_seconds, texts = None, [], [], []
    for i, p in enumerate(tqdm(people, desc="streaming documents")):
        t0 = time.perf_counter()
        text = profile_text(p, rng)
        texts.append(text)
        if memory is None:
            memory = mind.memorize(text, ids=[p["id"]], storage=args.storage, progress=False)
        else:
            mind.add(memory, text, ids=[p["id"]])
        add_seconds.append(time.perf_counter() - t0)
        if i + 1 in checkpoints:
            for q in people[: i + 1]:
                rows += ask(mind, memory, q, i + 1, "stream", args.topk)
            context = "\n\n".join(texts)
            if not args.no_context and len(mind.tokenizer(context)["input_ids"]) < mind.context_window - 64:
                for q in people[: i + 1]:
                    rows += ask(mind, None, q, i + 1, "stream", args.topk, context=context)
    # update: a third of the documents get a new city and locker number
    edited = people[::3]
    for p in tqdm(edited, desc="replacing documents"):
        p["city"] = rng.choice([c for c in CITIES if c != p["city"]])
        p["locker"] = rng.choice([n for n in range(100, 9999) if n != p["locker"]])
        mind.replace(memory, p["id"], profile_text(p, rng))
        rows += ask(mind, memory, p, args.docs, "after_replace", args.topk)

    def acc(sel: list[dict], key: str = "correct") -> float:
        return statistics.mean(r[key] for r in sel) if sel else float("nan")

    curve = []
    for n in checkpoints:
        sel = [r for r in rows if r["phase"] == "stream" and r["stored"] == n and r["method"] == "emt"]
        ctx = [r for r in rows if r["phase"] == "stream" and r["stored"] == n and r["method"] == "context"]
        first = [r for r in sel if int(r["doc"].split("-")[1]) < 5]
        curve.append(dict(stored=n, all=acc(sel), first5=acc(first), cites_doc=acc(sel, "cites_doc"), context=acc(ctx)))
    replaced = [r for r in rows if r["phase"] == "after_replace"]
    summary = dict(
        docs=args.docs, topk=args.topk, storage=memory.storage, memory_tokens=memory.num_tokens,
        median_add_seconds=statistics.median(add_seconds), curve=curve,
        after_replace=dict(n=len(replaced), accuracy=acc(replaced), cites_replaced_doc=acc(replaced, "cites_doc")),
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "items": rows}, indent=2))
    lines = ["| documents stored | EMT accuracy, all stored | EMT, first 5 | top citation is the document "
             "| documents in the prompt (context) |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {c['stored']} | {c['all']:.2f} | {c['first5']:.2f} | {c['cites_doc']:.2f} | {c['context']:.2f} |"
        for c in curve
    ]
    lines += ["", f"After replacing {len(edited)} documents with edited versions: answers follow the new version "
              f"{acc(replaced):.2f}, top citation in the replaced document {acc(replaced, 'cites_doc'):.2f} "
              f"({len(replaced)} questions). Memory: {memory.num_tokens} tokens, {memory.storage}; median time to "
              f"add one document {statistics.median(add_seconds):.2f} s."]  # fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curve, summary, args.out / "retention.png")


def plot(curve: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [c["stored"] for c in curve]
    ax.plot(xs, [c["all"] for c in curve], marker="o", label="all stored documents")
    ax.plot(xs, [c["first5"] for c in curve], marker="s", label="the first 5 documents")
    ax.plot(xs, [c["cites_doc"] for c in curve], marker="^", linestyle=":", label="top citation = the document")
    ax.plot(xs, [c["context"] for c in curve], marker="x", color="black", label="baseline: documents in the prompt")
    ax.axhline(summary["after_replace"]["accuracy"], color="gray", linestyle="--", label="after replace (new facts)")
    ax.set(xlabel="documents stored in memory", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"Retention, SmolLM2-135M, top-k {summary['topk']}, {summary['storage']}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
