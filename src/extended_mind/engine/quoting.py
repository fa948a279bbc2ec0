"""An answer that quotes a passage it read goes on quoting where the model hesitates. In chat form SmolLM2 reads the
prose passkey's block and starts "The pass key is", then wavers between the key (" ", the digits' lead) and a
definition (" a legendary artifact ..."): the definition won by 0.6-1.2 nats in 2 of 9 harness items. Where the
answer's last tokens stand word for word in a passage the answer reads, and the model is unsure of its next token,
the passage's next token is taken if the model counts it among its likeliest (docs/evaluation.md, "Quotes
followed")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from extended_mind.engine.blocks import BlockPlan

# answer tokens that must stand word for word in a passage: two match too often by chance ("of the", "in the")
QUOTE_TOKENS = 3
# the passage's next token must be among the model's this many likeliest: a quote the model would not consider is
# not followed
QUOTE_CANDIDATES = 5
# sentence ends: a quote is followed at most to its sentence's end, not on into the passage's next sentence, and an
# answer that ends its sentence sooner ends it (" 1993." stays, not " 1993 and lives with a goat named ...")
_SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class Quotes:
    """The passages an answer reads, as what follows each run of QUOTE_TOKENS tokens in them."""

    next_tokens: dict[tuple[int, ...], frozenset[int]]
    tokenizer: PreTrainedTokenizerBase
    stop_ids: frozenset[int]
    below: float  # the model is unsure: its likeliest token has a probability under this

    @classmethod
    def of(cls, plan: BlockPlan | None, blocks: torch.Tensor | None, tokenizer: PreTrainedTokenizerBase,
           stop_ids: set[int], below: float, answer_tokens: int) -> Quotes | None:  # fmt: skip
        """The quotes of `blocks` of `plan`'s memory for an answer of up to `answer_tokens`; None where nothing
        would be followed (no block read, no token ids to read them by, `below` 0, an answer too short to quote)."""
        if plan is None or blocks is None or not blocks.numel() or plan.token_ids is None:
            return None
        if below <= 0 or answer_tokens <= QUOTE_TOKENS:
            return None
        return cls({}, tokenizer, frozenset(stop_ids), below).reading(plan, blocks)

    def reading(self, plan: BlockPlan, blocks: torch.Tensor) -> Quotes:
        """These quotes for `blocks` instead: each run of consecutive blocks of one document is one passage (a
        quote does not run from one chosen passage into another)."""
        assert plan.token_ids is not None
        following: dict[tuple[int, ...], set[int]] = {}
        for run in plan.layout.runs(blocks):
            ids = plan.token_ids(torch.tensor(run)).tolist()
            for i in range(len(ids) - QUOTE_TOKENS):
                following.setdefault(tuple(ids[i : i + QUOTE_TOKENS]), set()).add(ids[i + QUOTE_TOKENS])
        return replace(self, next_tokens={k: frozenset(v) for k, v in following.items()})

    def follow(self, logits: torch.Tensor, token: int, generated: list[int]) -> int:
        """`token` (chosen from `logits`, the answer's tokens so far `generated`), or the quoted passage's next
        token: where the answer's last QUOTE_TOKENS tokens stand in a passage, the model's likeliest token is less
        likely than `below`, and the passage's next token is among its QUOTE_CANDIDATES likeliest (of several, the
        likeliest). Never instead of the answer's end or of a token that ends a sentence (an answer may say less
        than the passage), nor right after a sentence's end."""
        if len(generated) < QUOTE_TOKENS or token in self.stop_ids:
            return token
        after = self.next_tokens.get(tuple(generated[-QUOTE_TOKENS:]))
        if not after or token in after:
            return token
        if self._ends_sentence(generated[-1]) or self._ends_sentence(token):
            return token
        probs = torch.softmax(logits.float(), dim=-1)
        if float(probs.max()) >= self.below:
            return token
        for candidate in probs.topk(QUOTE_CANDIDATES).indices.tolist():
            if candidate in after:
                return candidate
        return token

    def _ends_sentence(self, token: int) -> bool:
        return self.tokenizer.decode([token]).rstrip(" ").endswith(_SENTENCE_ENDS)
