"""Speed of memory attention as ratios against the no-memory model measured in the same run (SmolLM2, fixed threads).

    python benchmarks/speed.py --threads 1 --sizes 2048 16384 65536 262144 --real-tokens 65536 --out runs/speed

Memories are made of real English text (Python's own documentation, `pydoc_data.topics`, shipped with CPython).
`--real-tokens` of it are memorized; larger sizes repeat those documents (same keys, so the scan and the index do
the same work as for new text; recall is measured on the real memory only). For every size:
  - decode: median ms per generated token (after the prompt) without memory, with exact search, with approximate
    search (faiss IVF + exact re-ranking; index build time reported), and for the reference approach, which copies
    the whole memory for every attention call (`reference_copy`);
  - prefill: ms for a 500-token prompt, exact and approximate;
  - peak RSS of each measurement (the process peak, reset before it where Linux allows);
  - recall@k of approximate against exact search, on the queries of real prompts over the real memory.
Memorization throughput is measured once against one plain forward pass over the same tokens.
Writes results.json, table.md and speed.png (ms/token against memory size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pydoc_data.topics
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from extended_mind import ExtendedMind, Memory
from extended_mind.base.documents import Document
from extended_mind.base.loading import resolve_device, resolve_dtype
from extended_mind.retrieval import search as search_module
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.scan_select import SCAN_ENV, scan_path, scan_report

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

PROMPTS = [
    "Explain what the yield statement does in a function.",
    "How do I format a floating point number with two decimals?",
    "What happens when an exception is raised inside a with block?",
    "Describe how class inheritance resolves method names.",
]


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_peak(mind: ExtendedMind) -> None:
    reset_peak_rss()
    if mind.model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(mind.model.device)


def peaks(mind: ExtendedMind, name: str) -> dict[str, float]:
    """Peak process RSS since the last reset, and on a GPU its peak allocated memory, in MB."""
    found = {f"{name}_peak_rss_mb": peak_rss_mb()}
    if mind.model.device.type == "cuda":
        found[f"{name}_peak_gpu_mb"] = torch.cuda.max_memory_allocated(mind.model.device) / 2**20
    return found


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def real_documents(tokenizer, tokens: int, chars: int = 6000) -> list[str]:
    """Documentation topics cut into pieces of at most `chars` characters (at paragraph breaks), until about
    `tokens` tokens: pieces small enough that a memory can be cut close to any size."""
    docs, total = [], 0
    for _, text in sorted(pydoc_data.topics.topics.items()):
        piece = ""
        for para in text.split("\n\n"):
            if piece and len(piece) + len(para) > chars:
                docs.append(piece)
                total += len(tokenizer(piece)["input_ids"])
                piece = ""
                if total >= tokens:
                    return docs
            piece = f"{piece}\n\n{para}" if piece else para
        if piece.strip():
            docs.append(piece)
            total += len(tokenizer(piece)["input_ids"])
        if total >= tokens:
            return docs
    return docs


def tiled(memory: Memory, size: int) -> Memory:
    """`memory`'s documents repeated (renamed, tensors shared) until it holds about `size` tokens."""
    segments, n, copy = [], 0, 0
    while n < size:
        for s in memory.segments:
            if n >= size:
                break
            doc = Document(f"{s.document.id}#{copy}", s.document.text, s.document.name)
            segments.append(dataclasses.replace(s, document=doc))
            n += s.num_tokens
        copy += 1
    return Memory(memory.identity, segments, memory.rope, memory.stride, memory.window, memory.storage)


def no_eos(mind: ExtendedMind) -> dict[int, float]:
    """A logit bias banning end-of-sequence: every timed run decodes exactly the tokens asked for (a run that stops
    early would look fast)."""
    eos = mind.tokenizer.eos_token_id
    return {} if eos is None else {int(eos): -100.0}


def decode_ms(mind: ExtendedMind, memory, tokens: int, repeats: int, **options) -> tuple[float, float]:
    """(median ms per decoded token, median ms to the first token) over `repeats` runs of one prompt, each exactly
    `tokens` tokens long (each token is read back to Python as it comes, so a GPU has finished it)."""
    steps, firsts = [], []
    for r in range(repeats):
        start = time.perf_counter()
        last = None
        stream = mind.stream(PROMPTS[r % len(PROMPTS)], memory=memory, max_new_tokens=tokens,
                             logit_bias=no_eos(mind), **options)  # fmt: skip
        for _ in stream:
            now = time.perf_counter()
            if last is None:
                firsts.append(now - start)
            else:
                steps.append(now - last)
            last = now
        if len(steps) != (r + 1) * (tokens - 1):
            raise RuntimeError(f"a timed run decoded fewer than {tokens} tokens")
    return 1000 * statistics.median(steps), 1000 * statistics.median(firsts)


def prefill_ms(mind: ExtendedMind, memory, repeats: int, **options) -> float:
    ids = mind.tokenizer(" ".join(pydoc_data.topics.topics["if"].split()) * 4)["input_ids"][:500]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in mind.stream(ids, memory=memory, max_new_tokens=1, **options):
            pass
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class ReferenceCopy:
    """The reference implementation's per-call cost: the whole memory copied for every attention call."""

    def __enter__(self):
        self.real = search_module._retrieve

        def copying(q, mem, settings, scaling):
            fresh = LayerMemory(mem.keys.clone(), mem.values.clone(), mem.inv_norms.clone())
            return self.real(q, fresh, settings, scaling)

        search_module._retrieve = copying
        return self

    def __exit__(self, *exc):
        search_module._retrieve = self.real


class RecallProbe:
    """Compares every approximate retrieval with exact search over the same keys (recall@k of the index), over all
    retrievals and over decoding steps only (one new token: `group` query rows per KV head). Prompt rows share the
    cells they probe, so they see more of the memory than a decoding step does."""

    def __init__(self, group: int):
        self.group = group

    def __enter__(self):
        self.real = search_module._retrieve
        self.hits = self.total = self.decode_hits = self.decode_total = 0

        def probing(q, mem, settings, scaling):
            logits, idx = self.real(q, mem, settings, scaling)
            if mem.index is not None:
                exact = dataclasses.replace(mem, index=None, scan=None)  # the scan is in the index's cell order
                _, ref = self.real(q, exact, settings, scaling)
                found = (idx.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1)  # (B, H, R, k): exact key also found
                self.hits += int(found.sum())
                self.total += found.numel()
                if q.shape[2] == self.group:
                    self.decode_hits += int(found.sum())
                    self.decode_total += found.numel()
            return logits, idx

        search_module._retrieve = probing
        return self

    def __exit__(self, *exc):
        search_module._retrieve = self.real

    @property
    def recall(self) -> float:
        return self.hits / max(self.total, 1)

    @property
    def decode_recall(self) -> float:
        return self.decode_hits / max(self.decode_total, 1)


def synchronize(mind: ExtendedMind) -> None:
    """Wait for the GPU's queued work before reading a clock (a no-op on the CPU)."""
    if mind.model.device.type == "cuda":
        torch.cuda.synchronize(mind.model.device)


def load(args: argparse.Namespace) -> ExtendedMind:
    """The model to time: the embedded default, a model directory, or (`--random-weights`) a directory's
    configuration and tokenizer with random weights of the same shapes, for a machine its weights cannot reach
    (times do not depend on the weights' values: every run decodes exactly `--tokens` tokens)."""
    if not args.random_weights:
        return ExtendedMind.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.model is None:
        raise SystemExit("--random-weights needs --model DIR (a directory with config.json and the tokenizer)")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model),
                                             dtype=resolve_dtype(args.dtype, device))  # fmt: skip
    return ExtendedMind(model.to(device), AutoTokenizer.from_pretrained(args.model), f"random:{args.model}")


def machine(mind: ExtendedMind) -> tuple[dict, str]:
    """What the timings ran on (CPU model and flags, or the GPU), and how exact search scans keys there."""
    if mind.model.device.type == "cuda":
        name = torch.cuda.get_device_name(mind.model.device)
        return {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda}, "scores on the GPU"
    scan = scan_report()
    pinned = os.environ.get(SCAN_ENV, "").strip() not in ("", "auto")  # a path set by hand: its own kernel
    in_force = scan_path()
    info = {"cpu": scan["machine"], "scan_ms": scan["ms"], "scan_kernels": None if pinned else scan.get("kernels")}
    return info, in_force + (" (pinned)" if pinned else "")


def memorize_ratio(mind: ExtendedMind, docs: list[str], repeats: int) -> dict:
    ids = torch.tensor([mind.tokenizer("\n\n".join(docs))["input_ids"][:8192]])
    window = 2048
    text = mind.tokenizer.decode(ids[0])

    ids = ids.to(mind.model.device)

    def plain():
        with torch.inference_mode():
            for s in range(0, ids.shape[1], window):
                mind.model(input_ids=ids[:, s : s + window], use_cache=False)
        synchronize(mind)

    def memorize():
        mind.memorize(text, progress=False)

    def reference():  # the reference re-runs a whole window for every stride of new tokens (K/V copies not counted)
        stride = window // 4
        with torch.inference_mode():
            for end in range(window, ids.shape[1] + stride, stride):
                mind.model(input_ids=ids[:, max(0, min(end, ids.shape[1]) - window) : end], use_cache=False)
        synchronize(mind)

    times = {}
    for name, fn in (("forward", plain), ("memorize", memorize), ("reference", reference)):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    n = ids.shape[1]
    return {"tokens": n, "forward_tok_s": n / times["forward"], "memorize_tok_s": n / times["memorize"],
            "reference_tok_s": n / times["reference"], "ratio": times["forward"] / times["memorize"],
            "reference_ratio": times["forward"] / times["reference"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384, 65536, 262144])
    ap.add_argument("--real-tokens", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=12, help="decoded tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--retrieval", default="tokens", choices=("tokens", "blocks"),
                    help="tokens: per-head top-k, what the exact/approximate search rows measure (block memory: "
                    "benchmarks/prefill_ratio.py)")  # fmt: skip
    ap.add_argument("--storage", default="bfloat16", help="precision of the stored memory")
    ap.add_argument("--skip-reference-above", type=int, default=65536, help="the copying reference is slow")
    ap.add_argument("--skip-memorize", action="store_true", help="skip the memorization throughput measurement")
    ap.add_argument("--no-approximate", action="store_true", help="time exact search only (no faiss index)")
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded SmolLM2)")
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="--model's configuration and tokenizer with random weights (times only)",
    )
    ap.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="model weights (default: float32 on a CPU, bfloat16 on a GPU)")
    ap.add_argument("--out", type=Path, default=Path("runs/speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mind = load(args)
    docs = real_documents(mind.tokenizer, args.real_tokens)
    # how exact search scans keys here: on a CPU chosen by measuring every path it offers (retrieval/scan_select.py)
    info, in_force = machine(mind)
    where = (f"GPU {info['gpu']} (torch {info['torch']}, CUDA {info['cuda']})" if "gpu" in info else
             f"CPU {info['cpu']['model']} ({', '.join(info['cpu']['flags'])}); measured ms per decode-step "
             f"shortlist over 16k keys: {info['scan_ms']}")  # fmt: skip
    print(f"{where}; exact scan: {in_force}; model {mind.source}, {mind.weights} weights", flush=True)
    results: dict = {"threads": args.threads, "topk": args.topk, "retrieval": args.retrieval, "storage": args.storage,
                     "exact_scan": in_force, "model": mind.source, "dtype": mind.weights,
                     "device": str(mind.model.device), **info}  # fmt: skip
    results["rows"] = []
    if not args.skip_memorize:
        print("memorization throughput ...", flush=True)
        results["memorize"] = memorize_ratio(mind, docs, args.repeats)
        print(results["memorize"], flush=True)

    start = time.perf_counter()
    real = mind.memorize(docs, storage=args.storage, progress=True)
    results["real_memory"] = {"tokens": real.num_tokens, "documents": len(docs), "seconds": time.perf_counter() - start}
    opts = {"topk": args.topk, "retrieval": args.retrieval}
    base_ms, base_first = decode_ms(mind, None, args.tokens, args.repeats, **opts)
    base_prefill = prefill_ms(mind, None, args.repeats, **opts)
    results["no_memory"] = {"decode_ms": base_ms, "first_token_ms": base_first, "prefill_500_ms": base_prefill}
    print("no memory", results["no_memory"], flush=True)

    for size in args.sizes:
        if size > real.num_tokens:
            memory = tiled(real, size)
        else:
            memory = _prefix(real, size)
        row: dict = {"size": memory.num_tokens}
        reset_peak(mind)
        row["exact_ms"], _ = decode_ms(mind, memory, args.tokens, args.repeats, search="exact", **opts)
        prefill_repeats = args.repeats if memory.num_tokens <= 65536 else 1  # minutes each beyond that on a CPU
        row["exact_prefill_500_ms"] = prefill_ms(mind, memory, prefill_repeats, search="exact", **opts)
        row.update(peaks(mind, "exact"))
        if not args.no_approximate:
            start = time.perf_counter()
            mind.generate("x", memory=memory, max_new_tokens=1, search="approximate", **opts)  # builds the index
            row["index_build_s"] = time.perf_counter() - start
            reset_peak(mind)
            row["approx_ms"], _ = decode_ms(mind, memory, args.tokens, args.repeats, search="approximate", **opts)
            row["approx_prefill_500_ms"] = prefill_ms(mind, memory, prefill_repeats, search="approximate", **opts)
            row.update(peaks(mind, "approx"))
        if memory.num_tokens <= real.num_tokens and not args.no_approximate:
            config = mind.model.config
            with RecallProbe(config.num_attention_heads // config.num_key_value_heads) as probe:
                for p in PROMPTS:
                    mind.generate(p, memory=memory, max_new_tokens=8, search="approximate", **opts)
            row["recall_at_k"] = probe.recall
            row["decode_recall_at_k"] = probe.decode_recall
        if memory.num_tokens <= args.skip_reference_above:
            with ReferenceCopy():
                row["reference_copy_ms"], _ = decode_ms(mind, memory, args.tokens, 1, search="exact", **opts)
        for key in ("exact_ms", "approx_ms", "reference_copy_ms"):
            if key in row:
                row[key.replace("_ms", "_ratio")] = row[key] / base_ms
        for key in ("exact_prefill_500_ms", "approx_prefill_500_ms"):
            if key in row:
                row[key.replace("_ms", "_ratio")] = row[key] / base_prefill
        results["rows"].append(row)
        print(row, flush=True)
        memory.prepared_layers.clear()
        memory.indexes.clear()
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_table(results, args.out)
    plot(results, args.out)


def _prefix(memory: Memory, size: int) -> Memory:
    segments, n = [], 0
    for s in memory.segments:
        if n >= size:
            break
        segments.append(s)
        n += s.num_tokens
    return Memory(memory.identity, segments, memory.rope, memory.stride, memory.window, memory.storage)


def write_table(results: dict, out: Path) -> None:
    nm = results["no_memory"]
    if "gpu" in results:
        where = f"GPU: {results['gpu']} (torch {results['torch']}, CUDA {results['cuda']}); keys scored on the GPU."
    else:
        cpu = results.get("cpu", {})
        where = (f"CPU: {cpu.get('model', '?')}, flags {', '.join(cpu.get('flags', [])) or 'none of AVX2/AVX512/VNNI'}"
                 f"; scan chosen by measuring (ms per decode-step shortlist over 16k keys): "
                 f"{results.get('scan_ms', '?')}.")  # fmt: skip
    gpu = "gpu" in results
    lines = [
        where,
        "",
        f"Model {results.get('model', '?')} ({results.get('dtype', '?')}). No memory: {nm['decode_ms']:.1f} ms/token, "
        f"500-token prefill {nm['prefill_500_ms']:.0f} ms ({results['threads']} thread(s), top-k {results['topk']}, "
        f"{results['storage']} memory, exact scan: {results.get('exact_scan', '?')}).",
        "",
        "| memory tokens | exact ms/token (x) | approx ms/token (x) | reference copy (x) | recall@k all / decode | "
        "prefill 500 exact / approx (x) | index build s | peak RSS exact / approx MB |"
        + (" peak GPU MB |" if gpu else ""),
        f"| --- | --- | --- | --- | --- | --- | --- | --- |{' --- |' if gpu else ''}",
    ]

    def cell(r: dict, key: str, digits: int = 0) -> str:
        return f"{r[key]:.{digits}f}" if key in r else "-"

    for r in results["rows"]:
        ref = f"{r['reference_copy_ms']:.0f} ({r['reference_copy_ratio']:.2f})" if "reference_copy_ms" in r else "-"
        rec = f"{r['recall_at_k']:.3f} / {r['decode_recall_at_k']:.3f}" if "recall_at_k" in r else "-"
        approx = f"{r['approx_ms']:.0f} ({r['approx_ratio']:.2f})" if "approx_ms" in r else "-"
        lines.append(
            f"| {r['size']:,} | {r['exact_ms']:.1f} ({r['exact_ratio']:.2f}) | {approx} | {ref} | {rec} | "
            f"{r['exact_prefill_500_ratio']:.2f} / {cell(r, 'approx_prefill_500_ratio', 2)} | "
            f"{cell(r, 'index_build_s', 1)} | {r['exact_peak_rss_mb']:.0f} / {cell(r, 'approx_peak_rss_mb')} |"
            + (f" {cell(r, 'exact_peak_gpu_mb')} |" if gpu else "")
        )
    m = results.get("memorize")
    if m is not None:
        lines += ["", f"Memorization: {m['memorize_tok_s']:.0f} tok/s against {m['forward_tok_s']:.0f} tok/s for "
                  f"one plain forward pass over the same {m['tokens']} tokens ({m['ratio']:.2f}x); the reference's "
                  f"recomputed windows: {m['reference_tok_s']:.0f} tok/s ({m['reference_ratio']:.2f}x)."]  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(results["no_memory"]["decode_ms"], color="gray", ls="--", label="no memory")
    ax.plot(sizes, [r["exact_ms"] for r in rows], "o-", label="exact search")
    approx = [(r["size"], r["approx_ms"]) for r in rows if "approx_ms" in r]
    if approx:
        ax.plot(*zip(*approx), "s-", label="approximate (IVF + re-rank)")
    ref = [(r["size"], r["reference_copy_ms"]) for r in rows if "reference_copy_ms" in r]
    if ref:
        ax.plot(*zip(*ref), "x:", label="reference (memory copied per call)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("ms per generated token")
    where = results.get("gpu") or f"{results['threads']} CPU thread(s)"
    ax.set_title(f"{results.get('model', 'SmolLM2-135M')} decode latency, {where}, top-k {results['topk']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)


if __name__ == "__main__":
    main()
