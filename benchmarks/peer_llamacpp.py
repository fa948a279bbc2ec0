"""Plain generation (no memory) of the same GGUF, side by side: llama.cpp (PyPI `llama-cpp-python`, built from its
source by `make peer`) against extended-mind's PyTorch model at each weight precision.

    python benchmarks/peer_llamacpp.py --threads 1 2 --prompt-tokens 500 --new-tokens 64 --repeats 3 --out runs/peer

Both read the same prompt token ids (a paragraph of the demo article, repeated to `--prompt-tokens`) and decode
exactly `--new-tokens` greedy tokens (end of sequence banned, so no run stops early). Per engine, precision and
thread count: prefill tokens/s (the prompt's tokens over the time to the first token) and decode tokens/s (the median
interval between later tokens), medians over `--repeats`; and the weight bytes each decoded token reads (the bound
on decode speed: bytes per token over the memory bandwidth the run reached). Our precisions: float32, bfloat16,
int8, bfloat16-int8 and int4 (int8 or 4-bit decode weights over float32 or bfloat16 ones, base/weights.py), those
this torch build runs, each decoding with the native step where it applies (engine/fast_step.py: "native" in the
weights column); "-eager" rows decode with the model's own forward; "-compiled" rows with the compiled step
(engine/compiled.py; compiled during the warm-up run, whose seconds each row reports); `--precisions int8-dynamic`
adds torch.ao's dynamic quantization of the linear layers (activations quantized too; it lost answers). Writes
results.json, table.md and peer.png; prints the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import torch

from extended_mind import ExtendedMind
from extended_mind.base.loading import default_gguf
from extended_mind.base.machine import cpu_info
from extended_mind.base.weights import DecodeLinear, decode_weights_available
from extended_mind.engine.fast_step import FastStep

PRECISIONS = ("float32", "bfloat16", "int8", "bfloat16-int8", "int4", "float32-eager", "int4-eager",
              "float32-compiled", "int8-compiled", "int4-compiled", "int8-dynamic")  # fmt: skip
# int8-dynamic lost answers (docs/measurements.md): on request only
DEFAULT_PRECISIONS = ("float32", "bfloat16", "int8", "bfloat16-int8", "int4", "int4-eager", "int4-compiled")


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """`tokens` token ids of the demo article's text (repeated when shorter)."""
    text = (files("extended_mind") / "data" / "aardwolf.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def rates(stamps: list[float], start: float, prompt_tokens: int) -> dict:
    """Prefill tokens/s (prompt over time to the first token) and decode tokens/s (median later interval)."""
    first = stamps[0] - start
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    decode = statistics.median(intervals) if intervals else float("nan")
    return {"prefill_tok_s": prompt_tokens / first, "decode_tok_s": 1.0 / decode, "decode_ms": decode * 1000}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and quantized weight once (the embedding table is
    read for one row only, so it is left out unless it is the output layer's weight too, read whole)."""
    total = 0
    table = model.get_input_embeddings().weight
    output = getattr(model.get_output_embeddings(), "weight", None)
    decoded = {id(m.weight) for m in model.modules() if isinstance(m, DecodeLinear)}  # base/weights.py
    for p in model.parameters():
        if p is table and p is not output:  # one row per token; read whole only as the (tied) output layer
            continue
        if id(p) in decoded:  # decode steps read the quantized codes instead (counted below)
            continue
        total += p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            total += sum(t.numel() * t.element_size() for t in module.codes())
    for module in model.modules():  # dynamically quantized linears keep their int8 weights outside parameters
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(module, "weight"):
            w = module.weight()
            total += w.numel() * w.element_size()
    return total


class _Ours:
    def __init__(self, precision: str):
        self.precision = precision
        self.mind: ExtendedMind | None = None

    def load(self) -> ExtendedMind:
        if self.mind is None:
            dtype = self.precision.removesuffix("-compiled").removesuffix("-eager")
            dtype = "float32" if dtype == "int8-dynamic" else dtype
            mind = ExtendedMind.from_pretrained(dtype=dtype, compile=self.precision.endswith("-compiled"))
            if self.precision.endswith("-eager"):  # the model's own forward at every step
                mind.native_step = None
            if self.precision == "int8-dynamic":
                mind.model = torch.ao.quantization.quantize_dynamic(mind.model, {torch.nn.Linear}, dtype=torch.qint8)
            self.mind = mind
        return self.mind

    def run(self, threads: int, ids: list[int], new_tokens: int) -> tuple[list[float], float, list[int]]:
        """Time stamps of each generated token, the start time and the tokens, for one run of our model."""
        mind = self.load()
        torch.set_num_threads(threads)
        eos = mind.tokenizer.eos_token_id
        start = time.perf_counter()
        stamps, tokens = [], []
        for tok in mind.stream(ids, max_new_tokens=new_tokens, chat=False, logit_bias={eos: -100}):
            stamps.append(time.perf_counter())
            tokens.append(tok.id)
        return stamps, start, tokens


_OURS = {p: _Ours(p) for p in PRECISIONS}


def llamacpp_stream(llm, ids: list[int], new_tokens: int, eos: int) -> Iterator[int]:
    import numpy as np

    def ban_eos(_, scores):
        scores[eos] = -np.inf
        return scores

    llm.reset()
    for i, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True, logits_processor=[ban_eos])):
        yield int(tok)
        if i + 1 == new_tokens:
            break


def llamacpp(gguf: Path, threads: int, ids: list[int], new_tokens: int, eos: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max(2048, len(ids) + new_tokens + 8), n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip

    def run() -> tuple[list[float], float, list[int]]:
        start = time.perf_counter()
        stamps, tokens = [], []
        for tok in llamacpp_stream(llm, ids, new_tokens, eos):
            stamps.append(time.perf_counter())
            tokens.append(tok)
        return stamps, start, tokens

    return run


def measure(run, repeats: int, prompt_tokens: int) -> dict:
    start = time.perf_counter()
    run()  # warm-up: first-call allocations, kernel choices and compiling are not what a user waits for every time
    warmup = time.perf_counter() - start
    samples = []
    tokens = None
    for _ in range(repeats):
        stamps, start, tokens = run()
        samples.append(rates(stamps, start, prompt_tokens))
    out = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    out["tokens"] = tokens
    out["warmup_s"] = warmup
    return out


def available_precisions(wanted: tuple[str, ...] = DEFAULT_PRECISIONS) -> list[str]:
    """The precisions of `wanted` this torch build runs."""
    kinds = {p: next((k for k in ("int8", "int4") if k in p and p != "int8-dynamic"), None) for p in wanted}
    found = [p for p in wanted if kinds[p] is None or decode_weights_available(kinds[p])]
    if "int8-dynamic" in wanted:
        try:
            torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 8)), {torch.nn.Linear},
                                                   dtype=torch.qint8)(torch.randn(1, 8))  # fmt: skip
        except Exception:  # no quantized engine in this build
            found.remove("int8-dynamic")
    return found


def markdown(results: dict) -> str:
    cpu = results["cpu"]
    lines = [f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags']) or 'none of interest'}; torch "
             f"{results['torch']}, llama-cpp-python {results.get('llama_cpp', 'not installed')}", "",
             f"Prompt {results['prompt_tokens']} tokens, {results['new_tokens']} new tokens (EOS banned), greedy; "
             f"medians of {results['repeats']} runs after a warm-up.", "",
             "| engine | weights | threads | prefill tok/s | decode tok/s | decode ms/token | weight MB read per token "
             "| GB/s reached | same tokens as float32 | warm-up run s |", "|" + "---|" * 10]  # fmt: skip
    for r in results["rows"]:
        mb = r["weight_bytes"] / 1e6
        gbs = r["weight_bytes"] * r["decode_tok_s"] / 1e9
        lines.append(f"| {r['engine']} | {r['weights']} | {r['threads']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_ms']:.1f} | {mb:.0f} | {gbs:.1f} | "
                     f"{r.get('same_tokens', '')} | {r.get('warmup_s', float('nan')):.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    short = {"extended-mind": "ours", "llama.cpp": "llama.cpp"}
    labels = [f"{short[r['engine']]}\n{r['weights'].split(' ')[0].replace('-dynamic', '').replace('-compiled', '+c')}"
              f"\n{r['threads']} thr"
              for r in rows]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.2), 4.2))
    for ax, key, title in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode tokens/s", "prefill tokens/s")):
        colors = ["#d62" if r["engine"] == "llama.cpp" else "#37a" for r in rows]
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    cpu = results["cpu"]
    fig.suptitle(f"SmolLM2-135M, no memory: llama.cpp vs extended-mind ({cpu['model']}; {', '.join(cpu['flags'])})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS)
    parser.add_argument("--out", type=Path, default=Path("runs/peer"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags'])}", flush=True)
    reference = _OURS["float32"].load()
    ids = prompt_ids(reference.tokenizer, args.prompt_tokens)
    eos = reference.tokenizer.eos_token_id
    results = {"cpu": cpu, "torch": torch.__version__, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
               "repeats": args.repeats, "rows": []}  # fmt: skip
    try:
        import llama_cpp

        results["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        print("llama-cpp-python is not installed (make peer builds it): its rows are left out", flush=True)
        llama_cpp = None
    gguf = default_gguf()
    precisions = available_precisions(tuple(args.precisions)) if args.precisions else available_precisions()
    for threads in args.threads:
        float32_tokens = None
        for precision in precisions:
            r = measure(lambda p=precision, t=threads: _OURS[p].run(t, ids, args.new_tokens), args.repeats, len(ids))
            float32_tokens = r["tokens"] if precision == "float32" else float32_tokens
            mind = _OURS[precision].load()
            failed = mind.compiled_step is not None and mind.compiled_step.failure
            native = isinstance(mind.decode_step, FastStep) and mind.decode_step.calls > 0
            weights = f"{precision} (compile failed: eager)" if failed else precision + (" native" if native else "")
            results["rows"].append({"engine": "extended-mind", "weights": weights, "threads": threads, **r,
                                    "weight_bytes": weight_bytes(mind.model)})  # fmt: skip
            print(markdown(results).splitlines()[-1], flush=True)
        if llama_cpp is not None:
            r = measure(llamacpp(gguf, threads, ids, args.new_tokens, eos), args.repeats, len(ids))
            results["rows"].append({"engine": "llama.cpp", "weights": f"GGUF ({gguf.name})", "threads": threads,
                                    **r, "weight_bytes": gguf.stat().st_size})  # fmt: skip
            print(markdown(results).splitlines()[-1], flush=True)
        for row in results["rows"]:
            if row["threads"] == threads:
                same = float32_tokens is not None and row["tokens"] == float32_tokens
                agree = sum(a == b for a, b in zip(row["tokens"], float32_tokens or []))
                row["same_tokens"] = "yes" if same else f"{agree}/{len(row['tokens'])}"
    for row in results["rows"]:
        row.pop("tokens", None)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(markdown(results))
    plot(results, args.out / "peer.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
