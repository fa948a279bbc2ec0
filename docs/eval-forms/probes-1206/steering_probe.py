"""Throwaway probe (not in the package): attention steered toward the slots (PASTA-like: log(lam) added to the slot
logits of the retrieval heads, or of every head), or an instruction line as the separator (env SEP); prose passkeys
and other harness tasks answered through the harness, each memory cached in runs/s49/mem."""
import hashlib, json, math, sys, time
from pathlib import Path
import torch
from extended_mind.attention import function as F
from extended_mind.bench.methods import Harness, parse_method
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.engine import mind as mind_module
from extended_mind.engine.heads import retrieval_heads
from extended_mind.engine.mind import ExtendedMind

torch.set_num_threads(2)
lengths = [int(x) for x in sys.argv[1].split(",")]
variants = sys.argv[2].split("|")
out = Path(sys.argv[3]); task = sys.argv[4]
n = int(sys.argv[5])
chat = "--completion" not in sys.argv
CFG = {"lam": 1.0, "heads": None}
F.plain_slot_step = lambda *a, **k: False
F._slots_by_sdpa = lambda *a, **k: False
orig_ml = F._memory_logits
def ml(module, qg, g, mem, session, scaling, attention_mask, positions, skv, kwargs):
    logits, idx, vals = orig_ml(module, qg, g, mem, session, scaling, attention_mask, positions, skv, kwargs)
    if mem.slot_tokens is None or CFG["lam"] == 1.0:
        return logits, idx, vals
    b, h, rows, k = logits.shape
    sq = rows // g
    heads = CFG["heads"]
    if heads is None:
        bonus = torch.full((h, g), math.log(CFG["lam"]))
    else:
        m = heads.get(module.layer_idx)
        if m is None:
            return logits, idx, vals
        bonus = (m.view(h, g).float() * math.log(CFG["lam"]))
    return (logits.view(b, h, g, sq, k) + bonus.view(1, h, g, 1, 1).to(logits.device)).view(b, h, rows, k), idx, vals
F._memory_logits = ml
last = {}
orig = mind_module.ExtendedMind.generate
def generate(self, *a, **k):
    r = orig(self, *a, **k); last["lp"] = [t.logprob for t in r.tokens]; last["passages"] = [p.text[:80] for p in r.passages]; return r
mind_module.ExtendedMind.generate = generate
mind = ExtendedMind.from_pretrained()
import os
if os.environ.get("SEP"):
    from extended_mind.engine import reading as R
    _sep = mind.tokenizer.encode(os.environ["SEP"].encode().decode("unicode_escape"), add_special_tokens=False)
    R.paragraph_break = lambda tok: list(_sep)
    print("separator", mind.tokenizer.convert_ids_to_tokens(_sep), flush=True)
RET = retrieval_heads(mind.head_scores)
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
        t = time.perf_counter(); m = mind.memorize(texts, stride=stride, progress=False); mind.calibrate(m) if hasattr(mind, "calibrate") else None; m.save(p); cache.clear(); cache[key] = m
        return m, time.perf_counter() - t
h = H(mind, chat=chat, prefix=not chat)
spec = TaskSpec(lengths=lengths, n=n, seed=0, depths=[0.1, 0.5, 0.9] if task.startswith(("passkey", "niah")) else None)
done = {(json.loads(l)["item"], json.loads(l)["variant"]) for l in open(out)} if out.exists() else set()
with open(out, "a") as f:
    for item in make_items(task, spec, mind.tokenizer):
        for v in variants:
            if (item.id, v) in done:
                continue
            method, _, boost = v.partition("@")
            CFG["lam"], CFG["heads"] = 1.0, None
            if boost:
                lam, _, which = boost.partition(":")
                CFG["lam"] = float(lam); CFG["heads"] = RET if which == "ret" else None
            got = h.answer(parse_method(method), item)
            lp = last.get("lp", [])
            rec = dict(item=item.id, answers=item.answers, variant=v, score=item.score(got["prediction"]), pred=got["prediction"][:120],
                       sure16=sum(lp[:16]) / max(1, len(lp[:16])), blocks=got.get("blocks_read"), read=got.get("answer_read"),
                       passages=last.get("passages"), secs=got["seconds"])
            print(json.dumps(rec), flush=True); f.write(json.dumps(rec) + "\n"); f.flush()
