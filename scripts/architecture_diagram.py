"""Draw docs/architecture.png from the code: the layers of the import-linter contract in pyproject.toml, top to
bottom, each with its modules and the layers it imports from, with counts (all below it, as the contract checks).

    python scripts/architecture_diagram.py [--out docs/architecture.png]
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

import matplotlib
import tomllib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "extended_mind"
ROLE = {
    "cli": "command line",
    "server": "OpenAI-compatible server, web page",
    "bench": "evaluation harness",
    "engine": "ExtendedMind: options, reading, decoding",
    "attention": "memory attention in the model",
    "memory": "Memory: documents, files, store",
    "retrieval": "top-k search over keys",
    "parallel": "torch.distributed group",
    "base": "errors, prompts, loading, rope",
}


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [[part.strip() for part in layer.split("|")] for layer in contract["layers"]]


def modules(unit: str) -> list[str]:
    folder = PACKAGE / unit
    if not folder.is_dir():
        return [unit]
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")


def imports_between(units: list[str]) -> Counter:
    """(importer unit, imported unit) -> number of import statements, over the package's modules."""
    counts: Counter = Counter()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        src = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("extended_mind."):
                dst = node.module.split(".")[1]
                if src in units and dst in units and src != dst:
                    counts[(src, dst)] += 1
    return counts


def draw(out: Path) -> None:
    rows = layers()
    units = [u for row in rows for u in row]
    fig, ax = plt.subplots(figsize=(11, 1.05 * len(rows) + 0.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    counts = imports_between(units)
    for r, row in enumerate(rows):
        y = len(rows) - r - 1
        width = 10.6 / len(row)
        for c, unit in enumerate(row):
            x = 0.2 + c * width
            ax.add_patch(FancyBboxPatch((x + 0.05, y + 0.12), width - 0.1, 0.76, boxstyle="round,pad=0.02",
                                        facecolor="#e8f0fb" if unit in ("server", "bench", "cli") else "#eef7ea",
                                        edgecolor="#445"))  # fmt: skip
            ax.text(x + 0.15, y + 0.7, f"{unit}/" if (PACKAGE / unit).is_dir() else f"{unit}.py", fontsize=11,
                    weight="bold", va="center")  # fmt: skip
            ax.text(x + 0.15 + 0.11 * len(unit) + 0.35, y + 0.7, ROLE.get(unit, ""), fontsize=8.5, va="center",
                    color="#333")  # fmt: skip
            names = modules(unit)
            per_line = max(4, int(width * 7.5))
            lines = [" ".join(names[i : i + per_line // 6 + 2]) for i in range(0, len(names), per_line // 6 + 2)]
            ax.text(x + 0.15, y + 0.42, "\n".join(lines[:2]), fontsize=7.5, va="center", color="#555")
            used = sorted(((d, n) for (s, d), n in counts.items() if s == unit), key=lambda t: units.index(t[0]))
            if used:
                ax.text(x + 0.15, y + 0.2, "imports from: " + ", ".join(f"{d} ({n})" for d, n in used), fontsize=7,
                        va="center", color="#2a6")  # fmt: skip
    down = sum(n for (s, d), n in counts.items() if units.index(s) < units.index(d))
    ax.set_title(f"extended-mind layers (top imports from below; {down} imports between layers, all downwards; "
                 "checked by lint-imports)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architecture.png")
    draw(parser.parse_args().out)
