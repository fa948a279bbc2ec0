"""Throwaway (session 53): general questions in completion form with 6k tokens of unrelated Wikipedia prose or of filler pasted before them (none and the lists pasted: the harness run in docs/eval-forms/quote/general-lists-6k/completion)."""
import json, sys, torch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.bench.tasks import TaskSpec, make_items
from extended_mind.bench.methods import prompt_text
from extended_mind.bench.synthetic import PASSKEY_FILLER
torch.set_num_threads(2)
form = sys.argv[1]
mind = ExtendedMind.from_pretrained()
tok = mind.tokenizer
lists = make_items("general-lists", TaskSpec(lengths=[6000], n=40), tok)
prose = make_items("general", TaskSpec(lengths=[6000], n=40), tok)[0].document
def cut(text, n):
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)
filler = cut(" ".join([PASSKEY_FILLER] * 400), 6000)
variants = {"prose": prose, "filler": filler}  # none (28 right) and the lists (34) are in the harness's results
score = {k: 0 for k in variants}
for item in lists:
    row = {"id": item.id}
    for k, pasted in variants.items():
        if form == "chat":
            q = f"{pasted.strip()}\n\n{item.question}".strip()
            r = mind.generate(q, chat=True, max_new_tokens=44)
        else:
            r = mind.generate(prompt_text(item, pasted), chat=False, max_new_tokens=12)
        s = item.score(r.text); score[k] += s; row[k] = (s, r.text[:40])
    print(json.dumps(row), flush=True)
print(json.dumps(score))
