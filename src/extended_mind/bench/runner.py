"""Running a task: every (item, method) pair once, appended to `results.jsonl` as it finishes, so that an
interrupted run resumes where it stopped; then `results.json`, the markdown table and the plots."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench.items import Item, mixes
from extended_mind.bench.methods import Harness, MethodSpec
from extended_mind.bench.report import write_report
from extended_mind.bench.tasks import TaskSpec, make_items, perplexity_docs


def _done(path: Path) -> dict[tuple[str, str], dict]:
    """Records already written (a truncated last line, from a run killed mid-write, is ignored)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(rec["item_id"], rec["method"])] = rec
    return done


def run_task(
    harness: Harness, task: str, methods: list[MethodSpec], spec: TaskSpec, out: Path, progress: bool = True
) -> dict:
    """Run `methods` on `task` into `out`; returns the results summary (also written as out/results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = _done(log)
    if done and log.read_bytes()[-1:] != b"\n":  # complete a line cut by a kill, so appends start cleanly
        with log.open("a") as f:
            f.write("\n")
    tokenizer = harness.mind.tokenizer
    if task == "perplexity":
        work = [(doc, m) for doc in perplexity_docs(spec, tokenizer) for m in methods]
    else:
        work = [(item, m) for item in make_items(task, spec, tokenizer) for m in methods]
    todo = [(x, m) for x, m in work if (x.id, m.label) not in done]
    bar = tqdm(total=len(work), initial=len(work) - len(todo), desc=task, disable=not progress, unit="run")
    doc_tokens: dict[str, int] = {}  # tokenized once per item, not once per method
    with log.open("a") as f:
        for x, method in todo:
            if task != "perplexity" and x.id not in doc_tokens:
                doc_tokens[x.id] = harness.count(x.document)
            rec = _run_one(harness, task, x, method, doc_tokens.get(x.id))
            if rec is not None:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[(x.id, method.label)] = rec
                value = rec.get("score", rec.get("perplexity"))
                bar.set_postfix_str(f"{method.label} L={rec['length']} {value:.3g}")
            bar.update(1)
    bar.close()
    wanted = {(x.id, m.label) for x, m in work}
    records = [r for key, r in done.items() if key in wanted]
    summary = {
        "task": task,
        "model": harness.mind.source,
        "methods": [m.label for m in methods],
        "lengths": spec.lengths,
        "n": spec.n,
        "seed": spec.seed,
        "depths": spec.depths,
        "threads": torch.get_num_threads(),
        "form": ("chat" if harness.chat else "completion") + ("" if harness.prefix else ", no answer prefix"),
        "machine": platform.processor() or platform.machine(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "records": records,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "results.json")
    write_report(summary, out)
    return summary


def _run_one(harness: Harness, task: str, x, method: MethodSpec, doc_tokens: int | None) -> dict | None:
    base = {"task": task, "item_id": x.id, "method": method.label, "settings": method.settings, "length": x.length}
    if task == "perplexity":
        got = harness.perplexity(method, x.prefix, x.local)
        return None if got is None else {**base, "doc_tokens": len(x.prefix) + len(x.local), **got}
    item: Item = x
    try:
        got = harness.answer(method, item)
    except ExtendedMindError as exc:  # one refused item (say, a prompt too long) must not end an hours-long run
        tqdm.write(f"{task} {x.id} {method.label}: {exc}")
        got = {"prediction": "", "seconds": 0.0, "error": str(exc)}
    return {
        **base,
        "depth": item.depth,
        "doc_tokens": doc_tokens,
        "question": item.question,
        "answers": item.answers,
        "score": item.score(got["prediction"]),
        **({"mixed": mixes(got["prediction"], item.meta["others"])} if "others" in item.meta else {}),
        **got,
        "meta": item.meta,
    }
