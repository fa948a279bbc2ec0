"""Per form: how often each answer-level aggregation puts the answer's sentence first (right answers only)."""
import json, sys
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.engine.mind import ExtendedMind
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from aggregations import A, first_n  # noqa: E402
tok = ExtendedMind.from_pretrained().tokenizer
pairs = {i.id: i for i in make_items("pair", TaskSpec(lengths=[2, 10], n=5, seed=0), tok)}
keys = ["sum", "sq", "cube", "p4", "p6", "peak", "ex_min", "ex_med", "first"]
tally = {}
for f in sys.argv[1:]:
    for l in open(f):
        r = json.loads(l)
        if r["score"] < 1 or not r.get("table"):
            continue
        n = first_n(r["tokens"])
        group = (r["form"], "pair" if r["task"] == "pair" else r["task"])
        t = tally.setdefault(group, {k: 0 for k in keys} | {"items": 0})
        t["items"] += 1
        for k in keys:
            best = max(r["table"], key=lambda s: A[k](r["table"][s], n))
            if r["task"] == "pair":
                it = pairs[r["id"]]
                ok = best in next(d for d in it.meta["documents"] if any(a in d for a in it.answers))
            else:
                ok = any(a.lower() in best.lower() for a in r["answers"])
            t[k] += ok
print("| form | task | right answers | " + " | ".join(keys) + " |")
print("|---|---|---|" + "---|" * len(keys))
tot = {}
for (form, task), t in sorted(tally.items()):
    print(f"| {form} | {task} | {t['items']} | " + " | ".join(str(t[k]) for k in keys) + " |")
    for k in keys + ["items"]:
        tot.setdefault(form, {}).setdefault(k, 0); tot[form][k] += t[k]
for form, t in tot.items():
    print(f"| {form} | all | {t['items']} | " + " | ".join(f"**{t[k]}**" for k in keys) + " |")
