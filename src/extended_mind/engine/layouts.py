"""Where the chosen blocks meet the question. Pasted text ends with a blank line before the question, and in chat
form SmolLM2 then answers a 2k needle from the passage (15 of 18) where the slots glued to the question are read as
the essay going on (10 of 18); but the same blank line turns filler passkeys into definitions ("The pass key is a
special code ...", 0 of 6 against 6 of 6). So both layouts, and a memory that fits the window read whole (needles
18 of 18), are tried for a few greedy tokens and the one the model answers most surely is kept (docs/evaluation.md,
"The surer of two layouts" and "The surer of three"). `block_break="question"`, the default for answers longer
than a label, reads the blocks' text after the question instead, then the question again ("The blocks read
after the question")."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, PreTrainedModel

from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.base.kv_cache import new_cache
from extended_mind.engine.blocks import BlockPlan
from extended_mind.engine.compiled import CompiledStep
from extended_mind.engine.decoding import biased, record_weights, row_forward
from extended_mind.engine.fast_step import FastStep
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.quoting import Quotes
from extended_mind.parallel.group import ShardGroup
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

# greedy tokens each layout answers before they are compared (in the development probe 4 and 8 chose worse on
# profiles and passkeys: answers open alike, "The pass key is", and part only after). An answer allowed fewer
# tokens keeps the prompt as it is: compared on one token, many-shot ICL's labels fell from 13 to 10 of 32.
SURE_TOKENS = 16


# an answer of this many tokens or fewer is a label (a class, a choice): it goes on from the pattern the blocks set
# right before it. Asked again after the blocks, many-shot ICL's one-token labels fell (chat 13 -> 8 of 32,
# completion 15 -> 14), so the default keeps labels glued ("surer" does for answers shorter than its trial).
LABEL_TOKENS = 1


def resolve_breaks(o: GenerationOptions, retrying: bool) -> str:
    """The layout `o.block_break` asks for; "auto": the blocks' text read after the question (it won the harness in
    both prompt forms, docs/evaluation.md "The blocks read after the question"), except for labels (LABEL_TOKENS)
    and where it cannot run (an uncertainty retry): there "surer"."""
    if o.block_break != "auto":
        return o.block_break
    return "surer" if o.max_new_tokens <= LABEL_TOKENS or retrying else "question"


@dataclass
class Trial:
    """A layout's first greedy answer tokens, read as the answer reads them: each step's logits and memory read,
    and the cache after them (holding the prompt and every token but the last). A greedy answer with this layout
    goes on from here instead of computing the same steps again."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    reads: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cache: DynamicCache | None = None
    lost: bool = False  # stopped once it could no longer be the surer

    @property
    def sureness(self) -> float:
        return float("-inf") if self.lost else sum(self.logprobs) / len(self.logprobs)


@dataclass
class Settled:
    """How the answer reads memory: its prompt, the plan and the layers its slots hold, and the trial that chose
    them (None where none ran)."""

    prompt_ids: list[int]
    plan: BlockPlan
    layers: dict[int, LayerMemory]
    trial: Trial | None = None
    chosen: torch.Tensor | None = None  # the blocks read, where the plan changed (else the caller's)
    quotes: Quotes | None = None  # what a greedy answer reading them goes on quoting (engine/quoting.py)


def settle_layout(model: PreTrainedModel, plan: BlockPlan, prompt_ids: list[int], layers: dict[int, LayerMemory],
                  settings: GenerationOptions, stop_ids: set[int], step: CompiledStep | FastStep | None = None,
                  group: ShardGroup | None = None, quotes: Quotes | None = None) -> Settled:  # fmt: skip
    """The prompt that reads the chosen blocks (`layers`): with `plan.separator` after the slots, or without it,
    whichever `plan.breaks` asks for. "surer": the layout whose first SURE_TOKENS greedy tokens have the higher mean
    log-probability, and a memory that fits the window read whole (`plan.read_whole`) is a third; a tie, or an
    answer of fewer tokens, keeps the prompt as it is. Sharded (`group`), rank 0's tokens and choice hold.
    `quotes`: those of the chosen blocks; the trials go on quoting as the answer does."""
    kept = Settled(prompt_ids, plan, layers, quotes=quotes)
    if not plan.separator or plan.whole is not None or plan.breaks == "never":
        return kept
    breaks = plan.breaks
    if breaks == "question":  # where it cannot (a sliding window shorter than the blocks), the surer layout
        settled = _read_after_question(model, plan, prompt_ids, layers)
        if settled is not None:
            return replace(settled, quotes=quotes)
        breaks = "surer"
    if breaks == "surer" and settings.max_new_tokens < SURE_TOKENS:
        return kept
    broken = Settled(plan.after_slots(prompt_ids), plan, layers, quotes=quotes)
    if breaks == "always":
        return broken
    options = [kept, broken]
    if plan.read_whole is not None:
        ids, whole = plan.read_whole
        every = whole.choose(None)
        whole_quotes = None if quotes is None else quotes.reading(whole, every)
        options.append(Settled(ids, whole, whole.slots(every), chosen=every, quotes=whole_quotes))
    best = None
    for option in options:  # each trial stops once it cannot beat the best before it
        beat = None if best is None else best.trial.sureness
        option.trial = _trial(model, option.prompt_ids, option.plan.positions(len(option.prompt_ids)), option.layers,
                              settings, stop_ids, step, group, beat, option.quotes)  # fmt: skip
        if best is None or option.trial.sureness > best.trial.sureness:
            best = option
    if group is not None:
        best = options[group.agree([options.index(best)], "agreeing on the layout")[0]]
    return best


def _trial(model: PreTrainedModel, ids: list[int], positions: list[int], layers: dict[int, LayerMemory],
           s: GenerationOptions, stop_ids: set[int], step: CompiledStep | FastStep | None,
           group: ShardGroup | None, beat: float | None = None, quotes: Quotes | None = None) -> Trial:  # fmt: skip
    """The greedy answer's first SURE_TOKENS tokens (fewer where it stops), through the answer's own forward;
    stopped early, `lost`, once its mean cannot pass `beat`: log-probabilities are at most 0, so the mean of the
    tokens to come is at most (sum so far) / SURE_TOKENS."""
    device = next(model.parameters()).device
    session = Session(layers=layers, settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
                      record_citations=True, citation_weighting=s.citation_weighting)  # fmt: skip
    trial = Trial(cache=new_cache(model.config))
    with session.active(), torch.inference_mode():
        for _ in range(SURE_TOKENS):
            session.citation_records = []
            logits = row_forward(model, step, session, trial.cache, ids, positions, device)
            chosen_from = biased(logits, s.logit_bias)
            token = int(chosen_from.argmax())
            if quotes is not None:
                token = quotes.follow(chosen_from, token, trial.tokens)
            if group is not None:  # every rank runs the same trial
                token = group.agree([token], "agreeing on a layout trial token")[0]
            trial.tokens.append(token)
            trial.logits.append(logits)
            trial.reads.append(record_weights(session.citation_records, model.config.num_attention_heads))
            trial.logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            if token in stop_ids:
                break
            lost = beat is not None and sum(trial.logprobs) < beat * SURE_TOKENS - 1e-6
            if group is not None:
                lost = bool(group.agree([int(lost)], "agreeing on a lost layout trial")[0])
            if lost:
                trial.lost = True
                break
            ids, positions = [token], [positions[-1] + 1]
    return trial


def _read_after_question(model: PreTrainedModel, plan: BlockPlan, prompt_ids: list[int],
                         layers: dict[int, LayerMemory]) -> Settled | None:  # fmt: skip
    """block_break="question": the chosen blocks read as their text pasted after the question, then the question
    asked again (question, blank line, blocks, blank line, question, the rest of the prompt). Their keys and values
    are computed afresh, with the question before them, in one pass over the question and their tokens: read in
    chat form with the question first, SmolLM2 answers from pasted text it ignores when the text comes first (a
    development probe: prose passkeys, 23 of 24 against 9 of 24). None where a sliding-window layer keeps fewer
    tokens than the blocks hold."""
    slot_tokens = next(iter(layers.values())).slot_tokens
    blocks = plan.layout.block_of[slot_tokens.cpu()].unique_consecutive()
    ids = plan.token_ids(blocks).tolist()
    asks_from = plan.insert if plan.select_from is None else plan.select_from
    asks_to = len(prompt_ids) if plan.select_to is None else plan.select_to
    context = prompt_ids[:asks_to] + list(plan.separator)
    device = next(model.parameters()).device
    cache = new_cache(model.config)
    # a sliding-window layer keeps its last sliding_window - 1 tokens (transformers' DynamicSlidingWindowLayer):
    # known before the pass, so a window shorter than the blocks costs no pass
    windows = [getattr(cache.layers[i], "sliding_window", None) for i in plan.read_layers if i < len(cache.layers)]
    if any(w is not None and w - 1 < len(ids) for w in windows):
        return None
    with torch.inference_mode():
        model(input_ids=torch.tensor([context + ids], device=device), use_cache=True, logits_to_keep=1,
              position_ids=torch.arange(len(context) + len(ids), device=device).unsqueeze(0),
              **with_cache(model, cache))  # fmt: skip
    fresh = replace(plan, insert=len(context), reserve=len(ids), separator=(), breaks="never", read_whole=None)
    out = {}
    for layer in plan.read_layers:
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        if keys.shape[2] < len(ids):
            return None
        keys, values = keys[0, :, -len(ids) :].contiguous(), values[0, :, -len(ids) :].contiguous()
        inv_norms = (1.0 / keys.float().norm(dim=-1).clamp_min(1e-12)).to(keys.dtype)
        out[layer] = LayerMemory(keys=keys, values=values, inv_norms=inv_norms, slot_tokens=slot_tokens,
                                 slot_end=fresh.slot_end, value_norms=values.float().norm(dim=-1))  # fmt: skip
    return Settled(context + list(plan.separator) + prompt_ids[asks_from:], fresh, out, chosen=blocks)
