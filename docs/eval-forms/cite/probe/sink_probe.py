import torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.memory.citations import sparse_sum
torch.set_num_threads(2)
mind = ExtendedMind.from_pretrained()
items = list(make_items("passkey-prose", TaskSpec(lengths=[8192], n=1, seed=0, depths=[0.5, 0.9]), mind.tokenizer))
for item in items:
    m = mind.memorize([item.document], progress=False)
    r = mind.generate(item.question, memory=m, max_new_tokens=24)
    print("==", item.id, repr(r.text), [(p.text[:60]) for p in r.passages])
    idx, w = sparse_sum([t.memory_indices for t in r.tokens], [t.memory_weights for t in r.tokens])
    w = w / len(r.tokens)
    order = torch.argsort(w, descending=True)[:15]
    lo = int(idx.min())
    print("  read tokens", len(idx), "from", lo, "to", int(idx.max()), "total", float(w.sum()))
    for j in order.tolist():
        a, b = m.segments[0].tensors["spans"][int(idx[j])].tolist()
        print(f"   pos {int(idx[j])} (+{int(idx[j]) - lo}) w={float(w[j]):.4f} {m.segments[0].document.text[a:b]!r}")
