import json, sys
from collections import defaultdict
recs = defaultdict(dict)
for l in open(sys.argv[1]):
    r = json.loads(l); recs[r["item"]][r["variant"]] = r
a, b = sys.argv[2], sys.argv[3]
n = len(recs); tot = defaultdict(int)
for item, v in recs.items():
    if a not in v or b not in v or "none" not in v: continue
    pick = v[b] if v[a]["blocks"] == 0 and v[b]["sure16"] > v[a]["sure16"] else v[a]
    tot["read nothing"] += v[a]["blocks"] == 0
    tot["n"] += 1
    for name, r in [(a, v[a]), (b, v[b]), ("none", v["none"]), ("surer", pick)]:
        tot[name] += r["score"]
        if v["none"]["score"]: tot[name + " kept"] += r["score"]
    tot["known"] += v["none"]["score"]
    if v[a]["score"] != v[b]["score"]:
        print(item, v[a]["answers"], f"{a}: {v[a]['score']} {v[a]['sure16']:.2f} {v[a]['pred'][:50]!r} | {b}: {v[b]['score']} {v[b]['sure16']:.2f} {v[b]['pred'][:50]!r}")
print(dict(tot))
