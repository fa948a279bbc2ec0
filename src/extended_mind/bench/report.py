"""Results as people read them: a markdown table (score by method and length) and PNG plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean, median


def _k(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def summarize(records: list[dict], key: str = "score") -> dict[str, dict[int, list[float]]]:
    """method -> length -> the values of `key`."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get(key) is not None:
            table[r["method"]][r["length"]].append(r[key])
    return table


def markdown_table(summary: dict) -> str:
    records, task = summary["records"], summary["task"]
    key = "perplexity" if task == "perplexity" else "score"
    table = summarize(records, key)
    lengths = sorted({r["length"] for r in records})
    unit = "perplexity of the last 2,048 tokens (lower is better)" if key == "perplexity" else "mean score, %"
    form = f"{summary['form']} form; " if summary.get("form") else ""
    lines = [f"**{task}** ({form}{unit}; n per cell in brackets; model {summary['model']}, {summary['threads']} "
             "threads)",
             "", "| method | " + " | ".join(_k(x) for x in lengths) + " | median s |",
             "|---" * (len(lengths) + 2) + "|"]  # fmt: skip
    for method in summary["methods"]:
        cells = []
        for length in lengths:
            vals = table.get(method, {}).get(length, [])
            if not vals:
                cells.append("–")
            elif key == "perplexity":
                cells.append(f"{mean(vals):.2f} ({len(vals)})")
            else:
                cells.append(f"{100 * mean(vals):.0f} ({len(vals)})")
        secs = [r["seconds"] for r in records if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {f'{median(secs):.1f}' if secs else '–'} |")
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", f"{len(errors)} run(s) refused and scored 0, e.g. {errors[0]['method']}: {errors[0]['error']}"]
    read = _read_nothing(summary)
    if read:
        lines += ["", read]
    if task == "ruler":
        lines += ["", _ruler_kinds(summary)]
    if task in ("general", "general-lists"):
        lines += ["", _retention(summary)]
    if task == "pair":
        lines += ["", _mixing(summary)]
    return "\n".join(lines) + "\n"


def _read_nothing(summary: dict) -> str:
    """How often block memory judged no block relevant and read nothing, per method."""
    parts = []
    for method in summary["methods"]:
        rows = [r for r in summary["records"] if r["method"] == method and "blocks_read" in r]
        if rows:
            parts.append(f"{method} {sum(r['blocks_read'] == 0 for r in rows)}/{len(rows)}")
    line = f"Answers that read no memory block: {'; '.join(parts)}." if parts else ""
    found = []  # where the answer sits in one place: was its block read (choice), and was it then answered (reading)
    for method in summary["methods"]:
        rows = [r for r in summary["records"] if r["method"] == method and "answer_read" in r]
        if rows:
            read = [r for r in rows if r["answer_read"]]
            right = [r for r in rows if r["score"] == 1.0]
            found.append(f"{method}: the answer's block read in {len(read)}/{len(rows)}, answered right in "
                         f"{sum(r['score'] == 1.0 for r in read)} of those; the top citation holds the answer in "
                         f"{sum(bool(r.get('answer_cited')) for r in right)} of the {len(right)} right")  # fmt: skip
    if found:
        line = f"{line} {'; '.join(found)}.".strip()
    return line


def _retention(summary: dict) -> str:
    """Of the questions answered right without memory (`none`), how many each method still answers right."""
    records = summary["records"]
    known = {r["item_id"] for r in records if r["method"] == "none" and r["score"] == 1.0}
    if "none" not in summary["methods"] or not known:
        return "(retention needs the `none` method: the questions answered right without memory)"
    out = [f"Questions answered right without memory: {len(known)}. Kept right with each method:", ""]
    for method in summary["methods"]:
        kept = sum(1 for r in records if r["method"] == method and r["item_id"] in known and r["score"] == 1.0)
        out.append(f"- {method}: {kept}/{len(known)} ({100 * kept / len(known):.0f}%)")
    return "\n".join(out)


def _mixing(summary: dict) -> str:
    """How often an answer names a fact of another document than the one asked about."""
    records = summary["records"]
    out = ["| method | answers naming another document's fact |", "|---|---|"]
    for method in summary["methods"]:
        rows = [r for r in records if r["method"] == method and "mixed" in r]
        if rows:
            out.append(f"| {method} | {sum(r['mixed'] for r in rows)}/{len(rows)} |")
    return "\n".join(out)


def _ruler_kinds(summary: dict) -> str:
    records = summary["records"]
    kinds = sorted({r["meta"]["kind"] for r in records})
    out = ["| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for method in summary["methods"]:
        cells = []
        for kind in kinds:
            vals = [r["score"] for r in records if r["method"] == method and r["meta"]["kind"] == kind]
            cells.append(f"{100 * mean(vals):.0f} ({len(vals)})" if vals else "–")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_report(summary: dict, out: Path) -> list[Path]:
    """table.md and the plots for this task; returns the files written."""
    (out / "table.md").write_text(markdown_table(summary))
    written = [out / "table.md"]
    if not summary["records"]:
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = summary["task"]
    key = "perplexity" if task == "perplexity" else "score"
    table = summarize(summary["records"], key)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in summary["methods"]:
        points = sorted(table.get(method, {}).items())
        if points:
            scale = 1 if key == "perplexity" else 100
            ax.plot([p[0] for p in points], [scale * mean(p[1]) for p in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in summary["records"]})
    ax.set_xticks(lengths, [_k(x) for x in lengths])
    ax.set_xlabel({"pair": "documents per memory", "icl": "demonstrations"}.get(task, "document length (tokens)"))
    ax.set_ylabel("perplexity" if key == "perplexity" else "score (%)")
    if key == "score":
        ax.set_ylim(-3, 103)
    ax.set_title(f"{task}: {summary['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / ("perplexity.png" if key == "perplexity" else "accuracy_vs_length.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    if task == "niah":
        written.append(_heatmap(summary, out, plt))
    return written


def _heatmap(summary: dict, out: Path, plt) -> Path:
    records = summary["records"]
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    methods = summary["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 2.4 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, length in enumerate(lengths):
                vals = [r["score"] for r in records if r["method"] == method and r["depth"] == d
                        and r["length"] == length]  # fmt: skip
                if vals:
                    grid[i][j] = 100 * mean(vals)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(x) for x in lengths])
        first = ax is axes[0][0]
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if first else [])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("length (tokens)")
        if first:
            ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score (%)")
    path = out / "niah_heatmap.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
