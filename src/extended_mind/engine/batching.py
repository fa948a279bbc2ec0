"""Batched generation: several prompts decoded together, each with its own memory (or none), and rows joining a running
batch at any decode step (continuous batching, as the server uses it). The model's dense layers run on the whole
batch (left-padded, with an attention mask and per-row positions, so a prompt whose memory shifts its positions
keeps them); memory retrieval runs per row inside attention (`Session.rows`). Prompts that join together are
prefilled in one left-padded pass (each with its own block choice); prompts that join a running batch have their KV
cache merged into the batch's (the shorter left-padded, the padding masked). A greedy row whose layout was chosen by
trials (engine/layouts.py) is not prefilled: it joins with the kept trial's cache and tokens. With `prefill_chunk`,
a prompt longer than that which joins a running batch is prefilled a chunk per step instead, alone, before each
decode step of the running rows, and joins when its last chunk is in: the running rows' streams never stall for a
whole prompt (as vLLM's chunked prefill). A row that finishes (stop token, stop string, token budget) or whose
consumer is gone (`cancelled()`) leaves at the next step. Each row has its own decoding options (temperature, seed,
stop strings, logit bias, token budget); rows share the retrieval settings (top-k, ranking, threshold, citation
weighting): `compatible` tells whether a stream can join. Greedy rows give the tokens they give alone, up to float
rounding differences between batched and unbatched matmuls.

Models with sliding-window layers or the ALiBi adapter keep per-row state in their caches (what a sliding layer
kept; alibi.py's key positions) that merging caches of different lengths would break: there, `can_merge` is false,
rows start together or not at all, and finished rows keep their place until all are done, as they always did in
`generate_batch` (dropping them was not shown to be safe there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.alibi import is_alibi_module
from extended_mind.attention.patching import attention_modules
from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.base.kv_cache import new_cache
from extended_mind.engine.blocks import BlockPlan, select_blocks
from extended_mind.engine.decoding import Answer, GeneratedToken, GenerationResult, record_weights, stop_token_ids
from extended_mind.engine.fast_step import FastStep
from extended_mind.engine.generation import TokenStream
from extended_mind.engine.layouts import Trial, settle_layout
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.quoting import Quotes
from extended_mind.memory.memory import Memory
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings


@dataclass
class BatchRow:
    prompt_ids: list[int]
    memory: Memory | None
    layers: dict[int, LayerMemory]
    offset: int  # first position of the prompt (after the memory's positions under the "stored" policy)
    plan: BlockPlan | None = None  # block memory: slots chosen by a pass over the prompt without memory
    native: FastStep | None = None  # the native step (fast_step.py) for the steps where this row decodes alone

    @classmethod
    def of(cls, stream: TokenStream) -> BatchRow:
        """The row of a prepared (not started) token stream."""
        native = stream.step if isinstance(stream.step, FastStep) else None
        return cls(stream.prompt_ids, stream.memory, stream.layers, stream.offset, stream.plan, native)

    def positions(self) -> list[int]:
        if self.plan is not None:
            return self.plan.positions(len(self.prompt_ids))
        return list(range(self.offset, self.offset + len(self.prompt_ids)))


def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[BatchRow], s: GenerationOptions
) -> list[GenerationResult]:
    """Decode `rows` together from the start, all with settings `s`; the results in the rows' order."""
    results: list[GenerationResult | None] = [None] * len(rows)

    def sink(i: int) -> Sink:
        return lambda item: results.__setitem__(i, item) if isinstance(item, GenerationResult) else None

    batch = DecodeBatch(model, tokenizer, max_batch=len(rows))
    batch.join_many([(r, s, sink(i), lambda: False) for i, r in enumerate(rows)])
    while len(batch):
        batch.step()
    return results


Sink = Callable[[GeneratedToken | GenerationResult], None]


def retrieval_key(s: GenerationOptions) -> tuple:
    """What rows of one batch must share (retrieval runs inside attention with one set of settings)."""
    return (s.topk, s.ranking, s.similarity_threshold, s.citation_weighting)


def can_merge(model: PreTrainedModel) -> bool:
    """Whether rows can share a KV cache: no sliding-window layers, no ALiBi adapter (attention/alibi.py keeps key
    positions on the cache)."""

    config = model.config
    sliding = (
        getattr(config, "sliding_window", None)
        or getattr(config, "layer_types", None)
        and any(t != "full_attention" for t in config.layer_types)
    )
    return not sliding and not any(is_alibi_module(m) for m in attention_modules(model))


@dataclass
class _Row:
    row: BatchRow
    layers: dict[int, LayerMemory]
    sink: Sink
    cancelled: Callable[[], bool]
    answer: Answer
    position: int  # position id of the row's next input token
    logits: torch.Tensor | None = None  # (V,) next-token logits
    read: tuple[torch.Tensor, torch.Tensor] | None = None  # memory tokens the last forward pass read, weights
    reported: bool = False  # its result was handed over

    @property
    def done(self) -> bool:
        return self.answer.done


@dataclass
class _Prefill:
    """A row whose prompt is being prefilled a chunk per step; it joins the batch when the last chunk is in."""

    live: _Row
    cache: DynamicCache
    done: int = 0  # prompt tokens prefilled so far


class DecodeBatch:
    """A running batch (see the module docstring). Not thread-safe: one thread (the model's) calls it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch: int = 16,
        prefill_chunk: int | None = None,
    ):
        """`prefill_chunk`: prompt tokens prefilled per decode step for a row joining a running batch (None: the
        whole prompt at once)."""
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None, not {prefill_chunk!r}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[_Prefill] = []  # joined, prompts not yet all in (in arrival order)
        self.device = next(model.parameters()).device
        self.merge = can_merge(model)
        self.rows: list[_Row] = []
        self.key: tuple | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 for real keys, 0 for padding
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.n_heads = model.config.num_attention_heads

    def __len__(self) -> int:
        """Rows still decoding or being prefilled."""
        return sum(not r.done for r in self.rows) + len(self.prefilling)

    def compatible(self, s: GenerationOptions) -> bool:
        """Whether a stream with settings `s` can join now."""
        if s.uncertainty_threshold is not None:  # recomputes single steps: runs alone
            return not self.rows and not self.prefilling
        if not self.rows and not self.prefilling:
            return True
        return self.room() > 0 and retrieval_key(s) == self.key

    def join(self, row: BatchRow, s: GenerationOptions, sink: Sink, cancelled: Callable[[], bool]) -> None:
        """Prefill `row`'s prompt and add it to the batch (the caller checked `compatible`)."""
        self.join_many([(row, s, sink, cancelled)])

    def join_many(self, joining: list[tuple[BatchRow, GenerationOptions, Sink, Callable[[], bool]]]) -> None:
        """Prefill several rows' prompts in one left-padded forward pass and add them to the batch (the caller
        checked that each is `compatible` and that they share `retrieval_key`); with `prefill_chunk`, prompts
        longer than a chunk that join a running batch are prefilled in chunks by the next steps instead."""
        plans = [j[0].plan for j in joining]
        rows, layers, chosen, trials, quotes = self._choose_blocks([j[0] for j in joining], [j[1] for j in joining])
        live = []
        for (_, s, sink, cancelled), row, lay, c, plan, trial, quoted in zip(joining, rows, layers, chosen, plans,
                                                                              trials, quotes):  # fmt: skip
            blocks_read = None if c is None else int(c.numel())
            passages = [] if c is None or plan is None else plan.layout.passages(plan.memory, c)
            answer = Answer(s, row.memory, len(row.prompt_ids), getattr(row.memory, "shard", None), blocks_read,
                            passages, quoted)  # fmt: skip
            r = _Row(row, lay, sink, cancelled, answer, row.positions()[-1] + 1)
            # a greedy row's first steps are its layout trial's: it goes on from the trial's cache, not prefilled
            if trial is not None and s.temperature <= 0 and self.merge:
                self._resume(r, trial, retrieval_key(s))
            else:
                live.append(r)
        if self.prefill_chunk is not None and self.rows:  # the running rows go on while these are prefilled
            long = [r for r in live if len(r.row.prompt_ids) > self.prefill_chunk]
            self.prefilling.extend(_Prefill(r, new_cache(self.model.config)) for r in long)
            live = [r for r in live if len(r.row.prompt_ids) <= self.prefill_chunk]
        if live:
            self._prefill_together(live, retrieval_key(joining[0][1]))

    def _choose_blocks(
        self, rows: list[BatchRow], settings: list[GenerationOptions]
    ) -> tuple[list[BatchRow], list[dict], list[torch.Tensor | None], list[Trial | None], list[Quotes | None]]:
        """Block memory: each row's blocks, chosen by one pass over the prompts; a row that reads nothing becomes
        the plain model (its own prompt and positions), one that reads blocks gets its layout (engine/layouts.py).
        Returns the rows, their layers, their chosen blocks, the trials that chose their layouts and what their
        answers go on quoting."""
        layers = [r.layers for r in rows]
        plans = [r.plan for r in rows]
        trials: list[Trial | None] = [None] * len(rows)
        quotes: list[Quotes | None] = [None] * len(rows)
        if all(p is None for p in plans):
            return rows, layers, [None] * len(rows), trials, quotes
        by_heads = [p if p is not None and p.needs_pass else None for p in plans]
        masses: list[torch.Tensor | None] = [None] * len(rows)
        if any(p is not None for p in by_heads):  # (blocks chosen by similarity need no pass)
            masses = select_blocks(self.model, [r.prompt_ids for r in rows], [r.positions() for r in rows],
                                   by_heads)  # fmt: skip
        chosen = [p.choose(m) if p is not None else None for p, m in zip(plans, masses)]
        for i, (p, c) in enumerate(zip(plans, chosen)):
            if c is not None and not c.numel() and p.unread is not None:  # whole="unread": read it whole
                ids, plans[i] = p.unread
                rows[i], chosen[i] = replace(rows[i], prompt_ids=ids, plan=plans[i]), plans[i].choose(None)
        layers = [p.slots(c) if p is not None else lay for p, c, lay in zip(plans, chosen, layers)]
        rows = [replace(r, prompt_ids=r.plan.plain(r.prompt_ids), offset=0, plan=None)
                if c is not None and c.numel() == 0 else r for r, c in zip(rows, chosen)]  # fmt: skip
        for i, (r, c, s) in enumerate(zip(rows, chosen, settings)):
            if c is not None and c.numel():
                quoted = Quotes.of(r.plan, c, self.tokenizer, self.stop_ids, s.quote_threshold, s.max_new_tokens)
                settled = settle_layout(self.model, r.plan, r.prompt_ids, layers[i], s, self.stop_ids, r.native,
                                        getattr(r.memory, "shard", None), quoted)  # fmt: skip
                if settled.plan is not r.plan:  # the memory read whole was the surer layout, or the blocks read again
                    layers[i], chosen[i] = settled.layers, settled.chosen
                rows[i], trials[i] = replace(r, prompt_ids=settled.prompt_ids, plan=settled.plan), settled.trial
                quotes[i] = settled.quotes
        return rows, layers, chosen, trials, quotes

    def _resume(self, r: _Row, trial: Trial, key: tuple) -> None:
        """Row r joins where its greedy layout trial stands: the trial's tokens but the last are its first (handed
        over now), the trial's cache holds its prompt and them, and the last token is chosen by the next step from
        the logits that chose it in the trial."""
        for token, logits, read in zip(trial.tokens[:-1], trial.logits, trial.reads):
            tok = r.answer.add(token, logits, read, self.tokenizer, self.stop_ids)  # (not a stop token: not last)
            r.sink(tok)
            if r.done:  # a stop string in the trial's tokens: the answer ends here
                r.reported = True
                r.sink(r.answer.result())
                return
        r.logits, r.read = trial.logits[-1], trial.reads[-1]  # (one of each per trial token)
        r.position += len(trial.tokens) - 1
        self._add([r], trial.cache, torch.ones((1, trial.cache.get_seq_length()), dtype=torch.long), key)

    def _prefill_together(self, live: list[_Row], key: tuple) -> None:
        """One left-padded forward pass over the rows' prompts; the rows join the batch."""
        width = max(len(r.row.prompt_ids) for r in live)
        ids = torch.full((len(live), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        positions = torch.zeros((len(live), width), dtype=torch.long)
        for i, r in enumerate(live):
            m = len(r.row.prompt_ids)
            ids[i, width - m :], mask[i, width - m :] = torch.tensor(r.row.prompt_ids), 1
            positions[i, width - m :] = torch.tensor(r.row.positions())
        cache = new_cache(self.model.config)
        logits, cites = self._forward(live, ids, positions, mask, cache)
        for i, r in enumerate(live):
            r.logits, r.read = logits[i], cites[i]
        self._add(live, cache, mask, key)

    def _drop_cancelled_prefills(self) -> None:
        """Rows whose client went away while their prompts were prefilled in chunks leave now, with no token."""
        for p in [p for p in self.prefilling if p.live.cancelled()]:
            self.prefilling.remove(p)
            p.live.answer.cancel()
            p.live.reported = True
            p.live.sink(p.live.answer.result())

    def _prefill_chunk(self) -> None:
        """The next chunk of the first prompt being prefilled; with its last chunk in, the row joins the batch."""
        p = self.prefilling[0]
        prompt, positions = p.live.row.prompt_ids, p.live.row.positions()
        end = min(p.done + self.prefill_chunk, len(prompt))
        mask = torch.ones((1, end), dtype=torch.long)
        logits, cites = self._forward([p.live], torch.tensor([prompt[p.done : end]]),
                                      torch.tensor([positions[p.done : end]]), mask, p.cache)  # fmt: skip
        p.done = end
        if end == len(prompt):
            self.prefilling.pop(0)
            p.live.logits, p.live.read = logits[0], cites[0]
            self._add([p.live], p.cache, mask, self.key)

    def _add(self, live: list[_Row], cache: DynamicCache, mask: torch.Tensor, key: tuple | None) -> None:
        """Rows whose prompts are in join the running rows (their caches merged)."""
        if not self.rows:
            self.cache, self.mask, self.key = cache, mask, key
        else:
            self.cache, self.mask = _merge(self.cache, self.mask, cache, mask, self.model.config)
        self.rows.extend(live)

    def room(self) -> int:
        """How many more rows may join now."""
        return self.max_batch - len(self.rows) - len(self.prefilling) if self.merge or not self.rows else 0

    def step(self) -> None:
        """Prefill the next chunk of a joining prompt (`prefill_chunk`), then give every row its next token and run
        one forward pass for the rows still running. Finished rows leave the batch where caches can be merged;
        elsewhere they stay in place, fed padding, until every row is done."""
        self._drop_cancelled_prefills()
        if self.prefilling:
            self._prefill_chunk()
        next_ids = [self._advance(r) if not r.done else None for r in self.rows]
        for r in self.rows:
            if r.done and not r.reported:
                r.reported = True
                r.sink(r.answer.result())
        if all(r.done for r in self.rows):
            key = self.key if self.prefilling else None  # the rows being prefilled share it
            self.rows, self.cache, self.mask, self.key = [], None, None, key
            return
        keep = [i for i, r in enumerate(self.rows) if not r.done] if self.merge else list(range(len(self.rows)))
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
            self.mask = self.mask[keep]
            self._trim()
        ids = torch.tensor([[self.pad if next_ids[i] is None else next_ids[i]] for i in keep])
        positions = torch.tensor([[r.position] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        logits, cites = self._forward(self.rows, ids, positions, self.mask, self.cache)
        for i, r in enumerate(self.rows):
            r.logits, r.read = logits[i], cites[i]
            r.position += 1

    def _advance(self, r: _Row) -> int | None:
        """Choose and hand over row r's next token (the step of decoding.py); None: the row ended, no token."""
        tok = r.answer.add(r.answer.choose(r.logits, r.cancelled()), r.logits, r.read, self.tokenizer, self.stop_ids)
        if tok is None:
            return None
        r.sink(tok)
        return tok.id

    def _forward(self, rows: list[_Row], ids, positions, mask, cache) -> tuple[torch.Tensor, list]:
        layers = [r.layers for r in rows]
        s = rows[0].answer.options
        native = rows[0].row.native if len(rows) == 1 and ids.shape == (1, 1) else None
        if native is not None and bool(mask.all()):  # one row decoding alone, no padding: as a single answer
            alone = Session(layers=layers[0], settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
                            record_citations=bool(layers[0]), citation_weighting=s.citation_weighting,
                            row_positions=positions)  # fmt: skip
            if native.applies(cache, ids, alone):
                with torch.inference_mode():
                    out = native(cache, alone, input_ids=ids, position_ids=positions)
                return out.logits[:, -1].float(), [record_weights(alone.citation_records, self.n_heads)]
        session = Session(
            settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
            record_citations=any(layers),
            citation_weighting=s.citation_weighting,
            rows=layers,
            row_citations=[[] for _ in rows],
            row_positions=positions.to(self.device),
        )
        with session.active(), torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                             attention_mask=mask.to(self.device), use_cache=True, logits_to_keep=1,
                             **with_cache(self.model, cache))  # fmt: skip
        return out.logits[:, -1].float(), [record_weights(records, self.n_heads) for records in session.row_citations]

    def _trim(self) -> None:
        """Drop leading key columns that are padding in every row (left by rows that left)."""
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _merge(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor, config):
    """One cache holding the rows of `a` then those of `b`, the shorter left-padded (masked) to the longer."""
    length = max(mask_a.shape[1], mask_b.shape[1])

    def pad(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, H, L, D) -> left-padded to n
        return torch.nn.functional.pad(x, (0, 0, n - x.shape[2], 0))

    merged = new_cache(config)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        keys = torch.cat([pad(la.keys, length), pad(lb.keys, length)])
        values = torch.cat([pad(la.values, length), pad(lb.values, length)])
        merged.update(keys, values, i)
    masks = [torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in (mask_a, mask_b)]
    return merged, torch.cat(masks)
