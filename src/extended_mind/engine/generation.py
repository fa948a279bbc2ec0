"""The decoding loop: greedy (or sampled) generation with memory attention, citations per token and
uncertainty-triggered retrieval (a step whose next-token entropy is too high is recomputed with more memories)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.engine.blocks import BlockPlan, select_blocks
from extended_mind.engine.options import GenerationOptions
from extended_mind.memory.citations import Citation, cite, sparse_sum
from extended_mind.memory.memory import Memory
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings


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


class TokenStream:
    """Iterate for `GeneratedToken`s as they are produced; `.result` holds the full result once exhausted."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        memory: Memory | None,
        layers: dict[int, LayerMemory],
        offset: int,
        settings: GenerationOptions,
        plan: BlockPlan | None = None,
    ):
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.prompt_ids, self.layers, self.offset, self.settings = prompt_ids, layers, offset, settings
        self.plan = plan  # block memory: the slots are chosen when the stream starts
        self.result: GenerationResult | None = None
        self._iter = self._run()

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> GeneratedToken:
        return next(self._iter)

    def _run(self) -> Iterator[GeneratedToken]:
        s = self.settings
        device = next(self.model.parameters()).device
        session = Session(
            layers=self.layers,
            settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
            record_citations=bool(self.layers),
            citation_weighting=s.citation_weighting,
        )
        n_heads = self.model.config.num_attention_heads
        generator = torch.Generator(device="cpu").manual_seed(s.seed) if s.seed is not None else None
        group = getattr(self.memory, "shard", None) if self.layers or self.plan is not None else None
        plan = self.plan
        blocks_read = None
        if plan is not None:  # block memory: one pass over the prompt without memory chooses what is read
            prompt_positions = plan.positions(len(self.prompt_ids))
            mass = None  # blocks chosen by their similarity to the question need no pass
            if plan.similarity is None:
                mass = select_blocks(self.model, [self.prompt_ids], [prompt_positions], [plan])[0]
            chosen = plan.choose(mass)
            blocks_read = int(chosen.numel())
            if not blocks_read:  # nothing relevant: the plain model, with its own prompt and positions
                self.prompt_ids = plan.plain(self.prompt_ids)
                plan, group = None, None
                prompt_positions = list(range(len(self.prompt_ids)))
        if plan is not None:
            slot_sets = {plan.blocks: plan.slots(chosen)}

            def layers_for(k: int) -> dict[int, LayerMemory]:  # k: blocks read
                if k not in slot_sets:
                    slot_sets[k] = plan.slots(plan.choose(mass, k))
                return slot_sets[k]

            base_k, step_k = plan.blocks, s.topk_step
            session.layers = layers_for(base_k)
            session.record_citations = True
        elif blocks_read == 0:
            base_k, step_k = 0, 0

            def layers_for(k: int) -> dict[int, LayerMemory]:
                return {}

            session.layers, session.record_citations = {}, False
        else:
            prompt_positions = list(range(self.offset, self.offset + len(self.prompt_ids)))
            base_k, step_k = s.topk, s.topk_step

            def layers_for(k: int) -> dict[int, LayerMemory]:
                return self.layers

        use_memory = plan is not None or (bool(self.layers) and s.topk > 0 and blocks_read is None)

        def new_cache() -> DynamicCache:
            cache = DynamicCache(config=self.model.config)
            if s.uncertainty_threshold is not None and hasattr(cache, "activate_past_recording"):
                cache.activate_past_recording()  # sliding-window layers can only be cropped when recording
            return cache

        def forward(ids: list[int], pos: list[int], k: int, cache: DynamicCache):
            if plan is None:
                session.settings.topk = k
            else:
                session.layers = layers_for(k)
            session.citation_records = []
            input_ids = torch.tensor([ids], device=device)
            positions = torch.tensor([pos], device=device)
            session.row_positions = positions
            with session.active(), torch.inference_mode():
                out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                                 **with_cache(self.model, cache))  # fmt: skip
            idx, w = sparse_sum([r[0] for r in session.citation_records], [r[1] for r in session.citation_records])
            if len(session.citation_records):
                w = w / (len(session.citation_records) * n_heads)
            return out.logits[0, -1].float(), idx.cpu(), w.cpu()

        stop_ids = stop_token_ids(self.model, self.tokenizer)
        cache = new_cache()
        logits, idx, w = forward(self.prompt_ids, prompt_positions, base_k, cache)
        position = prompt_positions[-1] + 1
        generated: list[int] = []
        tokens: list[GeneratedToken] = []
        retrievals: list[Retrieval] = []
        text = ""
        finish_reason = "length"
        last_input, last_positions = self.prompt_ids, prompt_positions
        for step in range(s.max_new_tokens):
            k = base_k
            h = entropy(logits)
            retry = use_memory and s.uncertainty_threshold is not None and h > s.uncertainty_threshold and step_k > 0
            if group is not None and s.uncertainty_threshold is not None:
                retry = bool(group.agree([int(retry)], "agreeing on uncertainty retrieval")[0])
            if retry:
                k = base_k + step_k
                if step == 0:
                    cache = new_cache()
                else:
                    cache.crop(-1)
                logits, idx, w = forward(last_input, last_positions, k, cache)
                h2 = entropy(logits)
                retrievals.append(Retrieval(step=step, entropy=h, topk=base_k, new_topk=k, new_entropy=h2))
                h = h2
            token = next_token(biased(logits, s.logit_bias), s.temperature, generator)
            if group is not None:  # ranks of a sharded memory continue with rank 0's token, whatever they sampled
                token = group.agree([token])[0]
            if token in stop_ids:
                finish_reason = "stop"
                break
            generated.append(token)
            piece, text, hit = next_piece(self.tokenizer, generated, text, s.stop, step + 1 == s.max_new_tokens)
            citations = cite(self.memory, idx, w, max_spans=3) if self.memory is not None and len(idx) else []
            logprob, top = token_logprobs(logits, token, s.top_logprobs)
            tok = GeneratedToken(
                id=token, text=piece, entropy=h, topk=k, citations=citations, memory_indices=idx, memory_weights=w,
                logprob=logprob, top_logprobs=top,
            )  # fmt: skip
            tokens.append(tok)
            yield tok
            if hit >= 0:
                finish_reason = "stop"
                break
            if step + 1 == s.max_new_tokens:
                break
            last_input, last_positions = [token], [position]
            logits, idx, w = forward(last_input, last_positions, base_k, cache)
            position += 1

        citations: list[Citation] = []
        if self.memory is not None and tokens:
            all_idx, all_w = sparse_sum([t.memory_indices for t in tokens], [t.memory_weights for t in tokens])
            citations = cite(self.memory, all_idx, all_w / len(tokens))
        self.result = GenerationResult(
            text=text,
            tokens=tokens,
            citations=citations,
            retrievals=retrievals,
            prompt_tokens=len(self.prompt_ids),
            finish_reason=finish_reason,
            blocks_read=blocks_read,
        )
