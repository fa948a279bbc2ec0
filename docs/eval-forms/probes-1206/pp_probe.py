"""Throwaway probe (not committed): prose passkeys in chat form, no prefix; each memory built once and saved;
variants answered through the harness, each answer's token log-probabilities recorded."""
import hashlib, json, sys, time
from pathlib import Path
import torch
from extended_mind.bench.methods import Harness, parse_method
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.engine import mind as mind_module
from extended_mind.engine.mind import ExtendedMind

torch.set_num_threads(2)
lengths = [int(x) for x in sys.argv[1].split(",")]
variants = sys.argv[2].split("|")
out = Path(sys.argv[3]); task = sys.argv[4] if len(sys.argv) > 4 else "passkey-prose"
chat = "--completion" not in sys.argv
last = {}
orig = mind_module.ExtendedMind.generate
def generate(self, *a, **k):
    r = orig(self, *a, **k); last["lp"] = [t.logprob for t in r.tokens]; last["passages"] = [p.text[:80] for p in r.passages]; return r
mind_module.ExtendedMind.generate = generate
mind = ExtendedMind.from_pretrained()
cache = {}
class H(Harness):
    def memory(self, document, stride):
        texts = [document] if isinstance(document, str) else list(document)
        key = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]
        p = Path("runs/s49/mem") / key
        if key in cache:
            return cache[key], 0.0
        if p.exists():
            cache.clear(); cache[key] = mind.load_memory(p)
            return cache[key], 0.0
        t = time.perf_counter(); m = mind.memorize(texts, stride=stride, progress=False); m.save(p); cache.clear(); cache[key] = m
        return m, time.perf_counter() - t
h = H(mind, chat=chat, prefix=not chat)
n = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5].isdigit() else 1
spec = TaskSpec(lengths=lengths, n=n, seed=0, depths=[0.1, 0.5, 0.9] if task.startswith("passkey") else None)
done = {(json.loads(l)["item"], json.loads(l)["variant"]) for l in open(out)} if out.exists() else set()
with open(out, "a") as f:
    for item in make_items(task, spec, mind.tokenizer):
        for v in variants:
            if (item.id, v) in done:
                continue
            got = h.answer(parse_method(v), item)
            lp = last.get("lp", [])
            rec = dict(item=item.id, answers=item.answers, variant=v, score=item.score(got["prediction"]), pred=got["prediction"][:120],
                       sure16=sum(lp[:16]) / max(1, len(lp[:16])), blocks=got.get("blocks_read"), read=got.get("answer_read"),
                       passages=last.get("passages"), secs=got["seconds"], mem=got.get("memorize_seconds"))
            print(json.dumps(rec), flush=True); f.write(json.dumps(rec) + "\n"); f.flush()
