"""Throwaway: pasted prose around the passkey, in the user's message vs the system message (SmolLM2 chat, greedy)."""
import json, sys, torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
torch.set_num_threads(2)
mind = ExtendedMind.from_pretrained()
tok, model = mind.tokenizer, mind.model
items = list(make_items("passkey-prose", TaskSpec(lengths=[8192, 16384], n=1, seed=0, depths=[0.1, 0.5, 0.9]), tok))
DEFAULT_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
res = {}
for item in items:
    doc = item.document
    i = doc.index("The pass key is")
    for chars in (600, 1500, 3000, 6000):
        lo = max(0, i - int(chars * (1 - item.depth))); hi = lo + chars
        text = doc[lo:hi]
        forms = {
            "user": [{"role": "user", "content": text + "\n\n" + item.question}],
            "system": [{"role": "system", "content": text}, {"role": "user", "content": item.question}],
            "system+default": [{"role": "system", "content": DEFAULT_SYS + "\n\n" + text}, {"role": "user", "content": item.question}],
            "user-after": [{"role": "user", "content": item.question + "\n\n" + text}],
        }
        for name, msgs in forms.items():
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=24, do_sample=False)
            ans = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            ok = item.score(ans)
            res.setdefault(name, []).append(ok)
            print(json.dumps(dict(item=item.id, chars=chars, form=name, ok=ok, ans=ans[:100])), flush=True)
print({k: f"{sum(v):.0f}/{len(v)}" for k, v in res.items()})
