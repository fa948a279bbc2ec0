"""Throwaway probe: the blocks the default reads, pasted as text after the question (computed fresh, the question
before them) or before it, answered by the plain model; against the default. Memories cached in runs/s49/mem."""
import dataclasses, hashlib, json, sys, time
from pathlib import Path
import torch
from extended_mind.bench.methods import Harness, parse_method
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.engine import mind as mind_module
from extended_mind.engine.mind import ExtendedMind

torch.set_num_threads(2)
lengths = [int(x) for x in sys.argv[1].split(",")]
out = Path(sys.argv[2]); task = sys.argv[3]; n = int(sys.argv[4])
chat = "--completion" not in sys.argv
seed = 1 if "--seed1" in sys.argv else 0
last = {}
orig = mind_module.ExtendedMind.generate
def generate(self, *a, **k):
    r = orig(self, *a, **k); last["passages"] = [p.text for p in r.passages]; return r
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
        t = time.perf_counter(); m = mind.memorize(texts, stride=stride, progress=False); mind.calibrate(m); m.save(p); cache.clear(); cache[key] = m
        return m, time.perf_counter() - t
h = H(mind, chat=chat, prefix=not chat)
spec = TaskSpec(lengths=lengths, n=n, seed=seed, depths=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] if task == "niah" else ([0.1, 0.5, 0.9] if task.startswith("passkey") else None))
done = {json.loads(l)["item"] for l in open(out)} if out.exists() else set()
none = parse_method("none")
with open(out, "a") as f:
    for item in make_items(task, spec, mind.tokenizer):
        if item.id in done:
            continue
        last.clear()
        got = h.answer(parse_method("emt"), item)
        rec = dict(item=item.id, answers=item.answers, blocks=got.get("blocks_read"), read=got.get("answer_read"),
                   emt=item.score(got["prediction"]), emt_pred=got["prediction"][:100])
        passages = last.get("passages") or []
        if passages:
            text = "\n\n".join(p.strip() for p in passages)
            for name, q in (("after", f"{item.question}\n\n{text}"), ("before", f"{text}\n\n{item.question}"),
                            ("sandwich", f"{item.question}\n\n{text}\n\n{item.question}")):
                g = h.answer(none, dataclasses.replace(item, question=q))
                rec[name] = item.score(g["prediction"]); rec[name + "_pred"] = g["prediction"][:100]
        else:
            rec["after"] = rec["before"] = rec["sandwich"] = rec["emt"]
        print(json.dumps(rec), flush=True); f.write(json.dumps(rec) + "\n"); f.flush()
