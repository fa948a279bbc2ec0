"""Throwaway: the chat prose passkey misses, which tokens compete after 'The pass key is'."""
import json, sys, torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
torch.set_num_threads(2)
mind = ExtendedMind.from_pretrained()
items = list(make_items("passkey-prose", TaskSpec(lengths=[8192], n=1, seed=0, depths=[0.1, 0.5, 0.9]), mind.tokenizer))
for item in items:
    m = mind.memorize([item.document], progress=False)
    r = mind.generate(item.question, memory=m, max_new_tokens=12, top_logprobs=5)
    print(item.id, repr(r.text))
    for t in r.tokens[:8] if hasattr(r, "tokens") else []:
        print("   ", t)
    print(json.dumps(getattr(r, "logprobs", None), default=str)[:1500])
