"""Throwaway: answer-level citation aggregations compared on items whose answer sits in one memory sentence.
Usage: cite_forms.py OUT.jsonl chat|completion task:len[,len] ..."""
import json, sys, statistics, torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.bench.methods import Harness, parse_method
from extended_mind.memory.citations import cite, sparse_sum
torch.set_num_threads(2)
out, form, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
mind = ExtendedMind.from_pretrained()
h = Harness(mind, chat=form == "chat", prefix=form != "chat")
captured = {}
orig = mind.generate
def gen(*a, **k):
    r = orig(*a, **k); captured["r"] = r; return r
mind.generate = gen

def per_sentence(memory, toks):
    """(sentence text -> list of per-token weights) over the answer tokens."""
    table = {}
    for i, t in enumerate(toks):
        if not len(t.memory_indices):
            continue
        for c in cite(memory, t.memory_indices, t.memory_weights, max_spans=10**6, min_share=0.0):
            table.setdefault(c.text, [0.0] * len(toks))[i] = c.weight
    return table

def aggregations(memory, toks):
    table = per_sentence(memory, toks)
    if not table:
        return {}, {}
    n = len(toks)
    first = n
    for i, t in enumerate(toks):
        if t.text.strip().endswith((".", "!", "?")) and i >= 1:
            first = i + 1; break
    agg = {
        "sum": {s: sum(w) for s, w in table.items()},
        "peak": {s: max(w) for s, w in table.items()},
        "excess": {s: sum(max(0.0, x - statistics.median(w)) for x in w) for s, w in table.items()},
        "first": {s: sum(w[:first]) for s, w in table.items()},
        "share": {},
    }
    tot = [sum(table[s][i] for s in table) or 1.0 for i in range(n)]
    agg["share"] = {s: sum(x / tot[i] for i, x in enumerate(w)) for s, w in table.items()}
    return {k: max(v, key=v.get) for k, v in agg.items()}, table

spec = parse_method("emt")
with open(out, "a") as f:
    for t in tasks:
        name, lens = t.split(":")
        kw = {"depths": [0.1, 0.5, 0.9]} if name in ("passkey", "passkey-prose") else {}
        items = make_items(name, TaskSpec(lengths=[int(x) for x in lens.split(",")], n={"wikiqa": 6, "niah": 3, "pair": 5}.get(name, 1), seed=0, **kw), mind.tokenizer)
        for item in items:
            a = h.answer(spec, item)
            r = captured["r"]
            memory = h.memory(item.meta.get("documents", item.document), None)[0]
            tops, table = aggregations(memory, r.tokens)
            keep = sorted(table, key=lambda s: -sum(table[s]))[:30]
            rec = {"form": form, "task": name, "id": item.id, "score": item.score(a["prediction"]),
                   "prediction": a["prediction"][:80], "answers": item.answers,
                   "cited": {k: any(x.lower() in v.lower() for x in item.answers) for k, v in tops.items()},
                   "tops": {k: v[:60] for k, v in tops.items()},
                   "tokens": [t.text for t in r.tokens],
                   "table": {s: [round(x, 4) for x in table[s]] for s in keep}}
            print(json.dumps(rec), flush=True); f.write(json.dumps(rec) + "\n"); f.flush()
