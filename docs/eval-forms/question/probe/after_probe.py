"""Throwaway: the passkey window as a memory read whole after the question vs pasted after the question."""
import json, torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
torch.set_num_threads(2)
mind = ExtendedMind.from_pretrained()
tok = mind.tokenizer
items = list(make_items("passkey-prose", TaskSpec(lengths=[8192, 16384], n=1, seed=0, depths=[0.1, 0.5, 0.9]), tok))
res = {}
for item in items:
    doc = item.document; i = doc.index("The pass key is")
    for chars in (600, 1500):
        lo = max(0, i - int(chars * (1 - item.depth))); text = doc[lo:lo + chars]
        m = mind.memorize([text], progress=False)
        for name, opts in {"mem-after-whole": dict(memory_at="answer", whole="fits"),
                           "mem-before-whole": dict(memory_at="question", whole="fits"),
                           "mem-after-gate0": dict(memory_at="answer", block_gate=0.0, block_break="never"),
                           "mem-after-default": dict(memory_at="answer")}.items():
            r = mind.generate(item.question, memory=m, max_new_tokens=24, **opts)
            ok = item.score(r.text); res.setdefault(name, []).append(ok)
            print(json.dumps(dict(item=item.id, chars=chars, form=name, ok=ok, ans=r.text[:90])), flush=True)
print({k: f"{sum(v):.0f}/{len(v)}" for k, v in res.items()})
