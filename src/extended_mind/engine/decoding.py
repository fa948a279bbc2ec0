"""One decode step, shared by single (generation.py) and batched (batching.py) generation: the next token
(greedy or sampled, logit bias, the ranks of a sharded memory agreeing on rank 0's choice), stop tokens and stop
strings, log-probabilities, citations per token and for the whole answer; and what an answer is made of."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.engine.compiled import CompiledStep
from extended_mind.engine.fast_step import FastStep
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.quoting import Quotes
from extended_mind.memory.citations import Citation, Passage, cite, cite_answer, sparse_sum
from extended_mind.memory.memory import Memory
from extended_mind.parallel.group import ShardGroup

CANCELLED = -2  # the token of an answer whose client went away


def row_forward(model: PreTrainedModel, step: CompiledStep | FastStep | None, session: Session, cache,
                ids: list[int], positions: list[int], device: torch.device) -> torch.Tensor:  # fmt: skip
    """One row's forward pass (a prompt, or the next token) through `step` where it applies, else the model's own
    forward: the last position's logits in float32. Run inside `session.active()` and inference mode."""
    session.row_positions = torch.tensor([positions], device=device)
    inputs = dict(input_ids=torch.tensor([ids], device=device), position_ids=session.row_positions, use_cache=True,
                  logits_to_keep=1, **with_cache(model, cache))  # fmt: skip
    if step is not None and step.applies(cache, inputs["input_ids"], session):
        return step(cache, session, **inputs).logits[0, -1].float()
    return model(**inputs).logits[0, -1].float()


@dataclass
class Retrieval:
    """A step recomputed because its entropy (nats) exceeded the threshold."""

    step: int
    entropy: float
    topk: int
    new_topk: int
    new_entropy: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GeneratedToken:
    id: int
    text: str
    entropy: float
    topk: int
    citations: list[Citation]
    memory_indices: torch.Tensor = field(repr=False)
    memory_weights: torch.Tensor = field(repr=False)
    logprob: float = 0.0  # log-probability of this token under the model (before temperature and logit_bias)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens at this step


@dataclass
class GenerationResult:
    text: str
    tokens: list[GeneratedToken]
    citations: list[Citation]
    retrievals: list[Retrieval]
    prompt_tokens: int
    finish_reason: str = "stop"  # "stop": end of sequence or a stop string; "length": max_new_tokens reached
    blocks_read: int | None = None  # block memory: how many blocks the answer read (0: none was relevant)
    passages: list[Passage] = field(default_factory=list)  # block memory: the text those blocks hold

    @property
    def warnings(self) -> list[str]:
        """What a reader of an odd answer needs to know: an empty answer says why it is empty."""
        if self.tokens or self.finish_reason != "stop" or self.text:
            return []
        why = "the model ended its answer at once (its first token was the end of the sequence)"
        if self.blocks_read == 0:
            why += "; no memory block was relevant enough to read (block_relevance)"
        return [why + "; try the chat form, an answer_prefix, or rephrasing the question"]

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "citations": [c.to_dict() for c in self.citations],
            "retrievals": [r.to_dict() for r in self.retrievals],
            "blocks_read": self.blocks_read,
            "passages": [p.to_dict() for p in self.passages],
            "warnings": self.warnings,
        }


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under logits (V,) and the `top` most likely (token, log-probability)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top <= 0:
        return float(logp[token]), []
    values, ids = logp.topk(top)
    return float(logp[token]), list(zip(ids.tolist(), values.tolist()))


def biased(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """`logits` (V,) with OpenAI-style biases added: +100 or -100 in effect allow or ban tokens."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], device=logits.device)
    return logits.index_add(0, ids, torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device))


def entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else sampled from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    # shifted by the max, in float64: a tiny temperature then gives a one-hot, not nan
    probs = torch.softmax((logits.double() - logits.max()) / temperature, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def next_piece(
    tokenizer: PreTrainedTokenizerBase, generated: list[int], text: str, stop: tuple[str, ...], last: bool
) -> tuple[str, str, int]:
    """The text a new token adds: (piece, full text so far, index of a stop string in it or -1). The text is cut
    at a stop string; an incomplete UTF-8 character is held back until its next bytes arrive (unless `last`)."""
    new_text = tokenizer.decode(generated, skip_special_tokens=True)
    # a stop string can only end in the new piece: search from just before it
    found = [i for x in stop if (i := new_text.find(x, max(0, len(text) - len(x) + 1))) >= 0]
    hit = min(found, default=-1)
    if hit >= 0:
        new_text = new_text[:hit]
    if hit < 0 and new_text.endswith("\ufffd") and not last:
        return "", text, hit
    return new_text[len(text) :], new_text, hit


def record_weights(records: list[tuple[torch.Tensor, torch.Tensor]], n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory tokens one forward pass read for a row and their weights: the attention records of every memory
    layer summed and averaged over layers and heads (on the CPU, for citations). Layers that read the same slots
    (one shared index tensor, block memory) are summed densely: a sort over every layer's entries cost ~3 ms/token."""
    first = records[0][0] if records else None
    if first is not None and first.dim() == 1 and all(i is first and i.shape == w.shape for i, w in records):
        idx, order = first.long().sort()
        w = torch.stack([r[1] for r in records]).float().sum(0)[order]
    else:
        idx, w = sparse_sum([r[0] for r in records], [r[1] for r in records])
    if records:
        w = w / (len(records) * n_heads)
    return idx.cpu(), w.cpu()


@dataclass
class Answer:
    """One answer being decoded: each step chooses its next token from the last logits (`choose`) and adds it
    (`add`); `result()` once `done`."""

    options: GenerationOptions
    memory: Memory | None
    prompt_tokens: int
    group: ShardGroup | None = None  # the ranks of a sharded memory: all continue with rank 0's token
    blocks_read: int | None = None  # block memory: how many blocks the answer reads
    passages: list[Passage] = field(default_factory=list)  # ... and their text
    quotes: Quotes | None = None  # ... and what follows their words (a greedy answer goes on quoting them)
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    tokens: list[GeneratedToken] = field(default_factory=list)
    retrievals: list[Retrieval] = field(default_factory=list)
    text: str = ""
    finish: str = "length"
    done: bool = False

    def __post_init__(self) -> None:
        if self.generator is None and self.options.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.options.seed)

    def choose(self, logits: torch.Tensor, cancelled: bool = False) -> int:
        """The next token from logits (V,): biased, greedy or sampled (a greedy answer quoting a block it reads may
        go on quoting it: engine/quoting.py); CANCELLED when the client went away."""
        o = self.options
        if cancelled:
            token = CANCELLED
        else:
            logits = biased(logits, o.logit_bias)
            token = next_token(logits, o.temperature, self.generator)
            if self.quotes is not None and o.temperature <= 0:
                token = self.quotes.follow(logits, token, self.generated)
        if self.group is not None:  # whatever this rank sampled (or saw of its client), rank 0's choice holds
            token = self.group.agree([token])[0]
        return token

    def cancel(self) -> None:
        """End the answer where it stands: its client went away."""
        self.done, self.finish = True, "cancelled"

    def add(self, token: int, logits: torch.Tensor, read: tuple[torch.Tensor, torch.Tensor],
            tokenizer: PreTrainedTokenizerBase, stop_ids: set[int], entropy_now: float | None = None,
            topk: int | None = None) -> GeneratedToken | None:  # fmt: skip
        """Add `token` chosen from `logits` after reading memory tokens `read` (indices, weights). Returns the
        generated token, or None when the answer ends without one (a stop token, a cancelled client)."""
        o = self.options
        if token == CANCELLED or token in stop_ids:
            self.done, self.finish = True, "cancelled" if token == CANCELLED else "stop"
            return None
        self.generated.append(token)
        last = len(self.generated) == o.max_new_tokens
        piece, self.text, hit = next_piece(tokenizer, self.generated, self.text, o.stop, last)
        idx, w = read
        citations = cite(self.memory, idx, w, max_spans=3) if self.memory is not None and len(idx) else []
        logprob, top = token_logprobs(logits, token, o.top_logprobs)
        tok = GeneratedToken(token, piece, entropy(logits) if entropy_now is None else entropy_now,
                             o.topk if topk is None else topk, citations, memory_indices=idx, memory_weights=w,
                             logprob=logprob, top_logprobs=top)  # fmt: skip
        self.tokens.append(tok)
        if hit >= 0:
            self.done, self.finish = True, "stop"
        elif last:
            self.done = True
        return tok

    def result(self) -> GenerationResult:
        citations: list[Citation] = []
        if self.memory is not None and self.tokens:
            citations = cite_answer(self.memory, [t.memory_indices for t in self.tokens],
                                    [t.memory_weights for t in self.tokens])  # fmt: skip
        finish = "stop" if self.finish == "cancelled" else self.finish
        return GenerationResult(self.text, self.tokens, citations, self.retrievals, self.prompt_tokens, finish,
                                self.blocks_read, self.passages)  # fmt: skip
