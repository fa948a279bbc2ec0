"""A memory of about a million tokens of real text on one machine: build it once, then measure it.

    python benchmarks/million_tokens.py build --dir runs/million --tokens 1048576
    python benchmarks/million_tokens.py measure --dir runs/million --out runs/million-measure

`build` memorizes real, non-repeated text (the Wikipedia articles and essays of `extended-mind data fetch`, Python's
documentation topics, then the standard library's source files) in bfloat16 with SmolLM2, saving after every batch
of documents and reopening the saved memory, so the process never holds more than one batch; it resumes where a
killed run stopped. `measure` opens the saved memory and reports, with the CPU model and flags: open time (the
manifest, and the first question, which prepares the memory, or maps what an earlier run prepared), peak RSS,
500-token prefill and decode ms/token against the no-memory model in the same run, the answer, and with `--recall`
the recall@10 of the search block selection uses against brute force over every key. `plot` puts the measured
runs side by side in docs/million.json and docs/million.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc_data.topics
import resource
import sysconfig
import time
from pathlib import Path

import torch
from speed import PROMPTS, decode_ms, prefill_ms

from extended_mind import ExtendedMind, Memory
from extended_mind.base.documents import Document
from extended_mind.bench.data import source_dir, wikipedia
from extended_mind.memory.memory import is_saved_memory
from extended_mind.retrieval import selection
from extended_mind.retrieval.scan_select import kernels, scan_report

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")


def real_texts() -> list[tuple[str, str]]:
    """(id, text) of real text, none repeated: articles, essays, documentation topics, then library sources."""
    out = [(f"wiki/{a.title}", a.text) for a in wikipedia()]
    out += [(f"essay/{p.stem}", p.read_text()) for p in sorted(source_dir("essays").glob("*.txt"))]
    out += [(f"pydoc/{k}", v) for k, v in sorted(pydoc_data.topics.topics.items()) if len(v) > 200]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")):
        text = p.read_text(errors="replace")
        if len(text) > 2000:
            out.append((f"stdlib/{p.name}", text))
    return out


def build(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    path = Path(args.dir)
    memory = mind.load_memory(path) if is_saved_memory(path) else None
    done = {d.id for d in memory.documents} if memory is not None else set()
    total = memory.num_tokens if memory is not None else 0
    batch: list[Document] = []
    batch_tokens = 0
    start, at_start = time.perf_counter(), total
    for doc_id, text in real_texts():
        if total + batch_tokens >= args.tokens:
            break
        if doc_id in done:
            continue
        n = len(mind.tokenizer(text)["input_ids"])
        if total + batch_tokens + n > args.tokens:  # the last document is cut to land on the target
            keep = args.tokens - total - batch_tokens
            text = mind.tokenizer.decode(mind.tokenizer(text)["input_ids"][: max(keep - 2, 1)])
            n = keep
        batch.append(Document(doc_id, text, doc_id))
        batch_tokens += n
        if batch_tokens >= args.batch_tokens:
            memory, total = _save_batch(mind, memory, batch, path, args.storage)
            batch, batch_tokens = [], 0
            rate = (total - at_start) / (time.perf_counter() - start)
            print(f"{total:,} tokens memorized, {rate:.0f} tok/s, about {(args.tokens - total) / rate / 60:.0f} min "
                  "left", flush=True)  # fmt: skip
    if batch:
        memory, total = _save_batch(mind, memory, batch, path, args.storage)
    if not memory.calibrations or not memory.prepared_keys:  # as `extended-mind memorize` saves them with it
        calibrating = time.perf_counter()
        mind.calibrate(memory).save(path)
        seconds = time.perf_counter() - calibrating
        print(f"relevance calibration and prepared keys saved with the memory ({seconds:.1f} s)")
    print(f"done: {total:,} tokens in {len(memory.documents)} documents at {path}")


def _save_batch(mind: ExtendedMind, memory: Memory | None, batch: list[Document], path: Path, storage: str):
    if memory is None:
        mind.memorize(batch, storage=storage, progress=False).save(path)
    else:
        mind.add(memory, batch)
        memory.save(path)
    memory = mind.load_memory(path)  # reopened: the batch's tensors are dropped from this process
    return memory, memory.num_tokens


QUESTIONS = [
    "What does the aardwolf eat?",
    "Who wrote the essay about how to start a startup?",
    "What does the yield statement do in a function?",
    "When was the city founded?",
    "What is the capital of the country?",
]


def completion(question: str) -> str:
    """The completion-style prompt SmolLM2 reads memory best with (README, Limits)."""
    return f"Question: {question}\nAnswer:"


def exact_recall(mind: ExtendedMind, memory: Memory, k: int = 10) -> dict:
    """recall@k of the search block selection runs (the compact scan's shortlist, re-scored) against a brute-force
    float32 top-k over every key, for the retrieval heads' queries of QUESTIONS; and the same counting as found a
    missed key whose score equals the lowest score kept (a tie: identical keys, e.g. repeated text, score alike)."""
    hits, ties, total, rows = 0, 0, 0, 0
    real = selection.retrieve

    def check(q, mem, settings, scaling, values=True):
        nonlocal hits, ties, total, rows
        logits, idx, vals = real(q, mem, settings, scaling, values)
        full = torch.matmul(q.float(), mem.keys.float().transpose(1, 2))
        brute = full.topk(idx.shape[-1], dim=-1)
        kept_low = full.gather(-1, idx).amin(-1, keepdim=True)
        tied = brute.values <= kept_low + 1e-6 * kept_low.abs()
        for a, b, t in zip(*(x.reshape(-1, idx.shape[-1]).tolist() for x in (idx, brute.indices, tied))):
            found = [key in set(a) for key in b]
            hits += sum(found)
            ties += sum(1 for f, is_tie in zip(found, t) if not f and is_tie)
            total, rows = total + len(b), rows + 1
        return logits, idx, vals

    selection.retrieve = check
    try:
        for question in QUESTIONS:
            mind.generate(completion(question), memory=memory, max_new_tokens=1, topk=k, chat=False)
    finally:
        selection.retrieve = real
    return {"k": k, "recall": round(hits / max(total, 1), 4), "recall_counting_ties": round((hits + ties) / total, 5),
            "query_rows": rows}  # fmt: skip


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mind = ExtendedMind.from_pretrained()
    scan = scan_report()
    machine = scan["machine"]
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    memory = mind.load_memory(args.dir)
    opened = time.perf_counter() - start
    question = completion(QUESTIONS[0])
    start = time.perf_counter()
    mind.generate(question, memory=memory, max_new_tokens=1, chat=False)
    first_s = time.perf_counter() - start
    rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    mind.generate(question, memory=memory, max_new_tokens=1, chat=False)
    again_s = time.perf_counter() - start
    answer = mind.generate(question, memory=memory, max_new_tokens=24, chat=False)
    no_mem_decode, _ = decode_ms(mind, None, args.decode_tokens, args.repeats)
    mem_decode, _ = decode_ms(mind, memory, args.decode_tokens, args.repeats)
    # the relevance test may read no block for the decode prompts (then the row above times the plain model): say
    # what they read, and time them again reading blocks
    read = [mind.generate(p, memory=memory, max_new_tokens=1).blocks_read for p in PROMPTS[: args.repeats]]
    reading_decode, _ = decode_ms(mind, memory, args.decode_tokens, args.repeats, block_relevance=0.0)
    no_mem_prefill = prefill_ms(mind, None, args.repeats)
    mem_prefill = prefill_ms(mind, memory, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recall = exact_recall(mind, memory) if args.recall else None
    report = {
        "machine": machine,
        "threads": args.threads,
        "exact_scan": {"choice": scan["choice"], "kernels_per_call": kernels(scan)},
        "memory": {"tokens": memory.num_tokens, "documents": len(memory.documents), "storage": memory.storage,
                   "bytes": memory.nbytes},  # fmt: skip
        "open_s": round(opened, 3),
        "first_question_s": round(first_s, 2),
        "same_question_again_s": round(again_s, 2),
        "answer": answer.text,
        "cited_documents": sorted({c.doc for c in answer.citations}),
        "rss_mb": {"model_loaded": round(baseline_rss), "after_first_question": round(rss_first),
                   "peak_before_recall_check": round(peak)},  # fmt: skip
        "decode_ms": {"none": round(no_mem_decode, 1), "memory": round(mem_decode, 1),
                      "ratio": round(mem_decode / no_mem_decode, 2), "blocks_read": read,
                      "reading_blocks": round(reading_decode, 1),
                      "reading_blocks_ratio": round(reading_decode / no_mem_decode, 2)},  # fmt: skip
        "prefill_500_ms": {"none": round(no_mem_prefill), "memory": round(mem_prefill),
                           "ratio": round(mem_prefill / no_mem_prefill, 2)},  # fmt: skip
        "exact_search_recall": recall,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"million-{args.label}.json").write_text(json.dumps(report, indent=1))
    print(f"CPU {machine['model']} ({', '.join(machine['flags'])}), {args.threads} thread(s)")
    print(json.dumps(report, indent=1))


def plot(args: argparse.Namespace) -> None:
    """The runs in --out side by side: one JSON (--json) and one PNG (--png) with time to the first answer, peak RSS
    and the decode and prefill ratios of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p.stem.removeprefix("million-"): json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))}
    order = [r for r in ("first-open", "reopened", "reopened-warm") if r in runs] + sorted(
        set(runs) - {"first-open", "reopened", "reopened-warm"}
    )
    Path(args.json).write_text(json.dumps({r: runs[r] for r in order}, indent=1))
    first = runs[order[0]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("open + first question (s)", [runs[r]["open_s"] + runs[r]["first_question_s"] for r in order]),
        ("peak RSS (GB)", [runs[r]["rss_mb"]["peak_before_recall_check"] / 1024 for r in order]),
    ]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(order, values, color="#4c72b0")
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax = axes[2]
    width = 0.38
    for j, (name, key) in enumerate((("decode", "decode_ms"), ("500-token prefill", "prefill_500_ms"))):
        values = [runs[r][key]["ratio"] for r in order]
        ax.bar([i + (j - 0.5) * width for i in range(len(order))], values, width, label=name)
    ax.set_xticks(range(len(order)), order)
    ax.set_title("x the no-memory model")
    ax.legend()
    machine = first["machine"]
    size = f"{first['memory']['tokens']:,} tokens ({first['memory']['storage']})"
    cpu = f"{machine['model']} ({', '.join(machine['flags'])})"
    fig.suptitle(f"SmolLM2-135M, block memory of {size}, {first['threads']} thread; {cpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.json} and {args.png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dir", required=True)
    b.add_argument("--tokens", type=int, default=1_048_576)
    b.add_argument("--batch-tokens", type=int, default=32_768)
    b.add_argument("--storage", default="bfloat16")
    b.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("measure")
    m.add_argument("--dir", required=True)
    m.add_argument("--out", default="runs/million-measure")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--decode-tokens", type=int, default=12)
    m.add_argument("--recall", action="store_true", help="also check the search against brute force (slow)")
    m.add_argument("--label", default="run", help="names the JSON written (e.g. first-open, reopened)")
    p = sub.add_parser("plot")
    p.add_argument("--out", default="runs/million-measure")
    p.add_argument("--json", default="docs/million.json")
    p.add_argument("--png", default="docs/million.png")
    args = ap.parse_args()
    {"build": build, "measure": measure, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
