"""Item-by-item: the quote probe (docs/eval-forms/quote/dev) against the default's recorded results."""
import json, os, sys
Q = sys.argv[1] if len(sys.argv) > 1 else "docs/eval-forms/quote/dev"
BASE = {  # task -> list of (dir, method)
    "passkey-prose": [("docs/eval-forms/question/passkey-prose", "emt[block_break=question]"),
                      ("docs/eval-forms/question-default/passkey-prose-32k", "emt")],
    "niah": [("docs/eval-forms/question/niah", "emt[block_break=question]")],
    "wikiqa": [("docs/eval-forms/question/wikiqa", "emt[block_break=question]")],
    "pair": [("docs/eval-forms/question/pair", "emt[block_break=question]")],
    "niah-8k": [("docs/eval-forms/question-default/niah-8k", "emt")],
    "general-lists": [("docs/eval-forms/question/general-lists", "emt[block_break=question]")],
    "general": [("docs/eval-forms/question-default/general", "emt")],
    "passkey": [("docs/eval-forms/question/passkey", "emt[block_break=question]")],
}
def recs(path, method):
    f = os.path.join(path, "results.json")
    if not os.path.exists(f): return {}
    return {r["item_id"]: r for r in json.load(open(f))["records"] if r["method"] == method}
for task, bases in BASE.items():
    for form in ("chat", "completion"):
        new = recs(f"{Q}/{task}/{form}", "emt")
        if not new: continue
        old = {}
        for d, m in bases: old.update(recs(f"{d}/{form}", m))
        none = recs(f"{Q}/{task}/{form}", "none")
        both = [i for i in new if i in old]
        s_new = sum(new[i]["score"] for i in both); s_old = sum(old[i]["score"] for i in both)
        diff = [i for i in both if new[i]["prediction"] != old[i]["prediction"]]
        line = f"{task:14s} {form:10s} items {len(both)}/{len(new)}  default {s_old:g} -> quote {s_new:g}  answers changed {len(diff)}"
        if none:
            known = [i for i in both if none.get(i, {}).get("score") == 1]
            line += f"  kept {sum(new[i]['score'] for i in known):g}/{len(known)} (default {sum(old[i]['score'] for i in known):g})"
        print(line)
        for i in diff:
            print(f"    {i}: {old[i]['score']:g} {old[i]['prediction'][:60]!r} -> {new[i]['score']:g} {new[i]['prediction'][:60]!r}")
