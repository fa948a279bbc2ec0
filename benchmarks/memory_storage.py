"""Compact storage: bytes per memory token and accuracy for each storage precision; open time of a large memory.

    python benchmarks/memory_storage.py --threads 2 --out runs/storage

Part 1 (SmolLM2-135M-Instruct): the retrieval items of benchmarks/choose_defaults.py (passkeys at 4k/12k tokens,
counterfactual QA on the bundled article) memorized once in float32, converted to bfloat16, float16 and int8
(`Memory.astype`, which tests show equals memorizing in that precision), saved, reopened and asked. Reports bytes
per memory token on disk, accuracy, mean answer log-probability and the largest next-token logit change against
float32 at the answer position.
Part 2: a synthetic memory with SmolLM2's shapes (30 layers, 3 KV heads, head dim 64) and `--big-tokens` tokens in
bfloat16 is saved; we time opening it (lazy: manifest and file sizes only) and the first full read (every tensor
file read and checksummed), median of `--repeats`, with the page cache dropped where permitted.
Writes results.json, table.md and storage.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from extended_mind import ExtendedMind, Memory
from extended_mind.base.documents import Document
from extended_mind.memory.segment import Segment

sys.path.insert(0, str(Path(__file__).parent))
from choose_defaults import answer_logprob, correct, passkey_items, qa_items  # noqa: E402

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

STORAGES = ("float32", "bfloat16", "float16", "int8")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "tensors").iterdir())


def accuracy_part(mind: ExtendedMind, scratch: Path, seed: int) -> list[dict]:
    items = passkey_items(random.Random(seed)) + qa_items()
    for item in tqdm(items, desc="memorizing (float32)"):
        item["memory"] = mind.memorize(item["doc"], storage="float32", progress=False)
    rows = []
    reference_logits = {}
    for storage in STORAGES:
        tokens = size = 0
        for i, item in enumerate(tqdm(items, desc=storage)):
            path = item["memory"].astype(storage).save(scratch / f"{storage}-{i}")
            memory = mind.load_memory(path)
            tokens += memory.num_tokens
            size += dir_bytes(path)
            result = mind.generate(
                item["question"], memory=memory, chat=item["chat"], answer_prefix=item["prefix"], max_new_tokens=16,
                stop=["\n"] if not item["chat"] else None,
            )  # fmt: skip
            prompt = mind.encode_prompt(item["question"], item["chat"], item["prefix"])
            last = mind.logits(torch.tensor([prompt]), memory)[0, -1].float()
            reference_logits.setdefault(i, last)
            rows.append(
                dict(
                    storage=storage, task=item["task"], length=item["length"], expect=item["expect"],
                    prediction=result.text, correct=correct(item, result.text),
                    logprob=answer_logprob(mind, item, memory),
                    max_logit_change=float((last - reference_logits[i]).abs().max()),
                    bytes_per_token=size / tokens,
                )
            )  # fmt: skip
    return rows


def open_part(scratch: Path, n_tokens: int, repeats: int) -> dict:
    """Save a SmolLM2-shaped bfloat16 memory of n_tokens, then time opening it and reading it in full."""
    layers, heads, dim, per_doc = 30, 3, 64, 4096
    rope = torch.ones(2048, dim)
    segments = []
    for d in tqdm(range(0, n_tokens, per_doc), desc="building the large memory"):
        n = min(per_doc, n_tokens - d)
        kv = [torch.randn(heads, n, dim) for _ in range(layers)]
        segments.append(
            Segment.build(Document(f"d{d}", "x" * n), kv, kv, torch.zeros(n), torch.zeros(n, 2), 512, 2048, "bfloat16")
        )
    from extended_mind.base.identity import ModelIdentity
    from extended_mind.memory.segment import RopeTables

    identity = ModelIdentity("synthetic", "0", "0", (0.0,))
    memory = Memory(identity, segments, RopeTables([rope], [rope], [0] * layers, [(heads, dim, dim)] * layers),
                    512, 2048, "bfloat16")  # fmt: skip
    path = scratch / "big"
    t0 = time.perf_counter()
    memory.save(path)
    save_s = time.perf_counter() - t0
    del memory, segments
    opens, reads, cold = [], [], True
    for _ in range(repeats):
        try:  # drop the page cache so "first read" means reading from disk (needs root; skipped otherwise)
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError:
            cold = False
        t0 = time.perf_counter()
        opened = Memory.load(path)
        opens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opened.verify()
        reads.append(time.perf_counter() - t0)
    return dict(tokens=n_tokens, gib=round(dir_bytes(path) / 2**30, 2), save_s=round(save_s, 2),
                open_s=round(statistics.median(opens), 3), first_read_s=round(statistics.median(reads), 2),
                page_cache_dropped=cold)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-tokens", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=Path("runs/storage-scratch"))
    parser.add_argument("--out", type=Path, default=Path("runs/storage"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    rows = accuracy_part(mind, args.scratch, args.seed)
    big = open_part(args.scratch, args.big_tokens, args.repeats)
    summary = []
    for storage in STORAGES:
        sel = [r for r in rows if r["storage"] == storage]
        summary.append(
            dict(
                storage=storage, bytes_per_token=round(sel[-1]["bytes_per_token"], 1),
                passkey_acc=statistics.mean(r["correct"] for r in sel if r["task"] == "passkey"),
                qa_acc=statistics.mean(r["correct"] for r in sel if r["task"] == "counterfactual_qa"),
                mean_logprob=statistics.mean(r["logprob"] for r in sel),
                max_logit_change=max(r["max_logit_change"] for r in sel),
            )
        )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"summary": summary, "large_memory": big, "items": rows}, indent=2)
    )
    n_pk = sum(r["task"] == "passkey" for r in rows) // len(STORAGES)
    n_qa = sum(r["task"] == "counterfactual_qa" for r in rows) // len(STORAGES)
    lines = [f"| storage | bytes per memory token | passkey ({n_pk}) | counterfactual QA ({n_qa}) "
             "| mean answer log p | max logit change vs float32 |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {s['storage']} | {s['bytes_per_token']:.0f} | {s['passkey_acc']:.2f} | {s['qa_acc']:.2f} | "
        f"{s['mean_logprob']:.3f} | {s['max_logit_change']:.3f} |"
        for s in summary
    ]
    lines += ["", f"Large memory: {big['tokens']} tokens, {big['gib']} GiB in bfloat16: saved in {big['save_s']} s, "
              f"opened in {big['open_s']} s, first full read with checksums {big['first_read_s']} s "
              f"(page cache {'dropped' if big['page_cache_dropped'] else 'not dropped'})."]  # fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(summary, args.out / "storage.png")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [s["storage"] for s in summary]
    axes[0].bar(names, [s["bytes_per_token"] for s in summary], color="tab:blue")
    axes[0].set(ylabel="bytes per memory token", title="Size (SmolLM2-135M: 30 layers x 3 KV heads x 64)")
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [s["passkey_acc"] for s in summary], width=0.4, label="passkey")
    axes[1].bar([i + 0.2 for i in x], [s["qa_acc"] for s in summary], width=0.4, label="counterfactual QA")
    axes[1].set_xticks(list(x), names)
    axes[1].set(ylabel="accuracy", ylim=(0, 1.05), title="Accuracy from the saved memory")
    axes[1].legend(loc="lower left")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
