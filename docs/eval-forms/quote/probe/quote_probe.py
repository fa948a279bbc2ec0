"""Throwaway probe: when the answer's last QUOTE_N tokens quote a passage it read, and the passage's next token is
among the model's top QUOTE_TOP candidates, take that token (greedy only). Runs the harness CLI with the patch."""
import os, sys, torch
from extended_mind.engine import decoding
from extended_mind.engine.decoding import Answer, biased, next_token

N = int(os.environ.get("QUOTE_N", 3)); MAXP = float(os.environ.get("QUOTE_MAXP", 0.5)); TOP = int(os.environ.get("QUOTE_TOP", 5))
TOK = None
_orig = Answer.choose
stats = {"steps": 0, "changed": 0}

def _sources(self):
    if not hasattr(self, "_quote_src"):
        self._quote_src = [TOK(p.text, add_special_tokens=False)["input_ids"] for p in self.passages] if TOK else []
    return self._quote_src

def choose(self, logits, cancelled=False):
    token = _orig(self, logits, cancelled)
    if cancelled or self.options.temperature > 0 or len(self.generated) < N or not self.passages:
        return token
    stops = {TOK.eos_token_id, TOK.convert_tokens_to_ids("<|im_end|>")}
    if token in stops:  # the model would end here: it ends
        return token
    if TOK.decode([token]).rstrip(" ").endswith((".", "!", "?", "\n")):  # the model ends its sentence: it does
        return token
    if TOK.decode(self.generated[-1:]).rstrip(" ").endswith((".", "!", "?", "\n")):  # a quote goes on to its sentence's end, not past it
        return token
    tail = self.generated[-N:]
    cands = []
    for src in _sources(self):
        for i in range(len(src) - N):
            if src[i:i + N] == tail:
                cands.append(src[i + N])
    if not cands:
        return token
    b = biased(logits, self.options.logit_bias)
    if float(torch.softmax(b.float(), -1).max()) >= MAXP:  # the model is sure: its own token
        return token
    top = b.topk(TOP).indices.tolist()
    for c in top:  # the model's most likely candidate among the quote's continuations
        if c in cands:
            stats["steps"] += 1
            stats["changed"] += int(c != token)
            if c != token:
                print("CHANGE", repr(TOK.decode(self.generated[-6:])), repr(TOK.decode([token])), "->", repr(TOK.decode([c])), file=sys.stderr)
            return c
    return token

Answer.choose = choose
from extended_mind.engine import mind as _mind
_orig_init = _mind.ExtendedMind.__init__
def _init(self, *a, **k):
    global TOK
    _orig_init(self, *a, **k)
    TOK = self.tokenizer
_mind.ExtendedMind.__init__ = _init
from extended_mind.cli.launch import main
rc = main(sys.argv[1:])
print("QUOTE", N, TOP, stats, file=sys.stderr)
sys.exit(rc)
