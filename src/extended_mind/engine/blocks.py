"""Block memory: the retrieval heads choose a few memory blocks, and the whole model reads them as context.

Token-level retrieval (every head of every layer takes its own top-k memory tokens) lets heads that do not
retrieve anything pull in memory tokens that match them by accident; on prose that swamps the local context
(perplexity 43 against 18 with no memory on SmolLM2) and mixes documents within one answer. Block memory instead:

1. Selection. The prompt is read once without memory. In that pass the retrieval heads (engine/heads.py) rank memory
   tokens by q·k with the rotation undone on both sides (by content, not by where a token sat in its window), take
   their top-k, and give each block (`block_size` consecutive tokens of one document) the softmax mass of its
   tokens, summed over heads and query rows. The `blocks` blocks with the most mass are chosen.
2. Reading. The chosen blocks, in document order, become slots: context placed between the prompt's head (its
   leading special tokens, or the chat template up to the user's message) and the rest of the prompt. Slot keys
   are rotated to consecutive positions there, and the prompt's later tokens are moved past them, so the model
   reads the blocks as a passage just before the question, with their order kept. Every head of every memory
   layer attends to the slots and its local context in one softmax; citations are the attention each slot token
   receives. The head of the prompt, which holds the attention sink, reads no memory.

For scoring long inputs (`ExtendedMind.logits`), rows are taken in chunks, each chunk reading the blocks its own
rows chose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from extended_mind.attention.patching import attention_modules
from extended_mind.attention.session import Session
from extended_mind.base.rope import apply_rope, extend_table
from extended_mind.engine.block_layout import BlockLayout
from extended_mind.engine.words import content_words
from extended_mind.memory.memory import Memory
from extended_mind.memory.precision import float_dtype
from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings
from extended_mind.retrieval.selection import BlockSelection

# a block is read when a question draws it this many spreads above what unrelated questions do (Relevance)
DEFAULT_MIN_RELEVANCE = 4.0
# ... and shares a content word with the question, unless it stands this many spreads out (BlockPlan.choose)
DEFAULT_WORDS_OVERRIDE = 8.0
# ... or, below that bar, when it stands this many spreads above the question's other blocks (the two best aside: a
# passage often spans two blocks) and at least OUTLIER_FLOOR spreads above what unrelated questions draw: a needle in
# repeated filler or in a short memory, which unrelated questions draw too, stands out from its neighbours alone
DEFAULT_OUTLIER = 8.0
OUTLIER_FLOOR = 1.5
# A question longer than this many rows chooses blocks from this many of its rows, evenly spread (the first and
# the last included): each choosing row scans the memory's keys in every retrieval head, so a 500-token prompt
# scanned a million tokens' keys 500 times (the prefill's main cost); the mass, a sum over rows, keeps its shape.
CHOOSING_ROWS = 64


def slot_positions(blocks: int, block_size: int) -> int:
    """Positions kept between the prompt's head and its question for the slots of `blocks` blocks."""
    return blocks * block_size


@dataclass
class BlockPlan:
    """Block memory for one prompt: what is read, where the slots go and how many positions they may take."""

    memory: Memory
    layers: dict[int, LayerMemory]  # the memory of every layer, keys unrotated ("zero" policy)
    read_layers: list[int]  # the layers that read the slots
    device: torch.device  # where slots go, in the model's dtype
    dtype: torch.dtype
    heads: dict[int, torch.Tensor]  # retrieval heads per layer
    layout: BlockLayout
    blocks: int  # blocks read at most
    gate: float  # a block is read only if its score is at least this fraction of the best block's
    settings: RetrievalSettings  # how retrieval heads rank tokens (topk, ranking, similarity threshold)
    insert: int  # prompt tokens before the slots
    reserve: int  # positions kept for slots: the most blocks any step may read x block size
    # (blocks,) share of the retrieval heads' mass each block gets whatever the question (neutral prompts): memory
    # tokens that draw these heads for any query (a document's opening tokens, most of all) are discounted by it
    prior: torch.Tensor | None = None
    select_from: int | None = None  # first prompt row whose retrieval heads choose blocks (None: insert)
    select_to: int | None = None  # the row after the last one that chooses (None: the prompt's end)
    # questions: what unrelated questions draw from this memory; a block is read only when the question draws it
    # `min_relevance` spreads beyond that (None: the prior's excess ranks blocks, as for scoring long inputs)
    relevance: Relevance | None = None
    min_relevance: float = DEFAULT_MIN_RELEVANCE
    sink_added: bool = False  # the prompt got a sink token for the slots (`plain` takes it away)
    # block_choice="embedding": (blocks,) cosine similarity of every block's text to the question's; blocks are then
    # ranked by it alone (the retrieval heads are not asked, and no selection pass is run)
    similarity: torch.Tensor | None = None
    # the question's content words (engine/words.py): a block the relevance test passes is read only when it (or
    # the block after it) shares one, unless it stands `words_override` spreads out (None: no word test)
    question_words: frozenset[str] | None = None
    words_override: float = DEFAULT_WORDS_OVERRIDE
    outlier: float = 0.0  # questions: also read a block this many spreads above the question's others (0: not)
    whole: tuple[int, int] | None = None  # every block read, then (at, n) n separator tokens at prompt row `at`
    # a memory that fits the window: the prompt and plan that read it whole (`unread`; "surer" tries it as a third
    # layout, engine/layouts.py)
    read_whole: tuple[list[int], BlockPlan] | None = None
    asks_memory: bool = False  # the question's words meet in one of the memory's sentences (engine/words.py)
    # a blank line that may go after the chosen blocks, as a pasted passage has before the question (read whole,
    # the memory has one already: `whole`); `breaks`: "surer" (engine/layouts.py), "always" or "never"
    separator: tuple[int, ...] = ()
    breaks: str = "never"
    # breaks="question" (engine/layouts.py): the token ids of blocks, whose text is read again after the question
    token_ids: Callable[[torch.Tensor], torch.Tensor] | None = None

    def positions(self, n_tokens: int) -> list[int]:
        """Position ids of a prompt of `n_tokens`: its head, then a gap for the slots, then the rest."""
        head = min(self.insert, n_tokens)
        return list(range(head)) + list(range(head + self.reserve, n_tokens + self.reserve))

    def plain(self, prompt_ids: list[int]) -> list[int]:
        """The prompt as the model reads it without memory (no sink or separator added for the slots)."""
        if self.whole is not None:
            prompt_ids = prompt_ids[: self.whole[0]] + prompt_ids[sum(self.whole) :]
        return prompt_ids[1:] if self.sink_added else prompt_ids

    @property
    def unread(self) -> tuple[list[int], BlockPlan] | None:
        """whole="unread": the prompt and plan that read the memory whole, for a question that draws no block but
        asks about the memory."""
        return self.read_whole if self.asks_memory else None

    def after_slots(self, prompt_ids: list[int]) -> list[int]:
        """The prompt that reads chosen blocks: `separator` right after the slots (the rows from `insert` on)."""
        if not self.separator or self.whole is not None:
            return prompt_ids
        return prompt_ids[: self.insert] + list(self.separator) + prompt_ids[self.insert :]

    @property
    def needs_pass(self) -> bool:
        """Whether a pass over the prompt chooses the blocks (not when they are chosen by similarity, or all read)."""
        return self.similarity is None and self.whole is None

    @property
    def slot_end(self) -> int:
        return self.insert + self.reserve

    def selection(self, row_group: torch.Tensor, groups: int) -> BlockSelection:
        selecting = {layer: self.layers[layer] for layer in self.heads if layer in self.layers}
        return BlockSelection(self.heads, selecting, self.layout.block_of, self.layout.num_blocks, row_group, groups,
                              self.settings)  # fmt: skip

    def choose(self, mass: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
        """Up to `n` (default: `blocks`) blocks, in document order, never one that got no mass.

        With `similarity`: the `n` blocks most similar to the question (`mass` is not used).

        With `relevance` (questions): the blocks whose share of the mass stands at least `min_relevance` spreads
        above what unrelated questions give them, and none when no block does (the question is not about the
        memory); a memory of at most `n` blocks is ranked the same way but not held to that bar (it is what a
        pasted note would be). Without it: the blocks whose mass most exceeds the prior. Either way only blocks
        scoring at least `gate` times the best one."""
        n = min(self.blocks if n is None else n, self.layout.num_blocks)
        if self.whole is not None or n <= 0:
            return torch.arange(n if self.whole is not None else 0)
        if self.similarity is not None:  # the nearest blocks, as RAG would take them
            return self.similarity.topk(n).indices.sort().values
        assert mass is not None, "block choice by the retrieval heads needs their mass"
        small = self.layout.num_blocks <= n
        if self.relevance is not None:
            score = self.relevance.score(mass)
        else:
            score = mass - self.prior * mass.sum() if self.prior is not None else mass.clone()
        standing = self._standing(score) if self.relevance is not None and self.outlier > 0 else None
        score[mass <= 0] = float("-inf")
        top = score.topk(n)
        keep = torch.isfinite(top.values)
        if self.relevance is not None and not small:
            passes = top.values >= self.min_relevance
            if standing is not None and self.min_relevance > 0:
                passes |= (top.values >= OUTLIER_FLOOR) & (standing[top.indices] >= self.outlier)
            keep &= passes
            if self.question_words is not None and self.min_relevance > 0:
                keep &= self._shares_words(top.indices, top.values)
        best = float(top.values[keep][0]) if bool(keep.any()) else float(top.values[0])
        if self.gate and best > 0:  # only blocks nearly as telling as the best one read
            keep &= top.values >= self.gate * best
        elif self.gate and small and self.relevance is not None:  # nothing stands out: the best one alone
            keep &= torch.arange(len(keep)) == 0
        chosen = top.indices[keep]
        if self.relevance is not None:
            chosen = self._with_neighbours(chosen, n)
        return chosen.sort().values

    @staticmethod
    def _standing(score: torch.Tensor) -> torch.Tensor:
        """(blocks,) how many spreads each block's relevance stands above the question's other blocks (their mean and
        spread without the two best); zeros when there are too few blocks to tell."""
        rest = score.sort(descending=True).values[2:]
        if len(rest) < 8:
            return torch.zeros_like(score)
        return (score - rest.mean()) / rest.std(correction=0).clamp_min(1e-6)

    def _shares_words(self, blocks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Per block (ranked with `scores`): whether it, or the block after it in its document, shares a content word
        with the question, or scores `words_override` or more."""
        words = self.question_words or frozenset()
        out = []
        for b, score in zip(blocks.tolist(), scores.tolist()):
            if score >= self.words_override:
                out.append(True)
                continue
            text = self.layout.text(self.memory, b)
            nxt = b + 1
            if nxt < self.layout.num_blocks and self.layout.docs[nxt] == self.layout.docs[b]:
                text += self.layout.text(self.memory, nxt)
            out.append(bool(content_words(text) & words))
        return torch.tensor(out, dtype=torch.bool)

    def _with_neighbours(self, chosen: torch.Tensor, n: int) -> torch.Tensor:
        """`chosen` (best first) and, while fewer than `n`, the block after each one in its document, then the block
        before: a passage the heads point at often goes on past its block's end or starts before its start (block
        edges fall anywhere: a filler passkey's block began at the key's second digit, and the answer wandered)."""
        picked = chosen.tolist()
        doc_of_block = self.layout.docs
        for step in (1, -1):
            for b in chosen.tolist():
                if len(picked) >= n:
                    return torch.tensor(picked, dtype=torch.long)
                other = b + step
                inside = 0 <= other < self.layout.num_blocks and doc_of_block[other] == doc_of_block[b]
                if inside and other not in picked:
                    picked.append(other)
        return torch.tensor(picked, dtype=torch.long)

    def slots(self, blocks: torch.Tensor) -> dict[int, LayerMemory]:
        """Per memory layer, the slots holding `blocks`: keys rotated to their positions, right before slot_end."""
        tokens = self.layout.tokens(blocks)
        if tokens.numel() == 0:
            return {}
        positions = torch.arange(self.slot_end - tokens.numel(), self.slot_end)
        fetched = self._fetch(tokens)
        out = {}
        dev = self.device
        slot_tokens = tokens.to(dev)  # one tensor shared by every layer: citations sum the layers' weights densely
        for layer in self.read_layers:
            table = self.memory.rope.layer_rope[layer]
            cos, sin = extend_table(self.memory.rope.cos[table], self.memory.rope.sin[table], self.slot_end)
            chosen_keys, chosen_values = fetched[layer]
            raw = chosen_keys.float()  # stored keys are pre-RoPE: what the "zero" policy rotates to position 0
            keys = apply_rope(raw, cos[positions].to(dev), sin[positions].to(dev)).to(self.dtype)
            inv_norms = 1.0 / raw.norm(dim=-1).clamp_min(1e-12).to(self.dtype)
            norms = chosen_values.float().norm(dim=-1)
            out[layer] = LayerMemory(keys=keys, values=chosen_values, inv_norms=inv_norms, slot_tokens=slot_tokens,
                                     slot_end=self.slot_end, value_norms=norms)  # fmt: skip
        return out

    def _fetch(self, tokens: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of `tokens` in every read layer, decoded from the stored documents (only those rows: the
        memory is not prepared for the layers that only read slots); from the ranks that hold them when the memory
        is sharded (one exchange for all layers)."""
        group = self.memory.shard
        held = tokens
        wire = self.dtype
        if group is not None:
            mine = torch.isin(tokens, self.memory.local_to_global())
            held = tokens[mine]
            # sent as stored when every document is stored alike in a float type (bfloat16: half the bytes); the
            # conversion to the model's dtype after the exchange gives the same numbers
            kinds = {s.storage for s in self.memory.segments}
            wire = (float_dtype(kinds.pop()) if len(kinds) == 1 else None) or torch.float32
        rows = []
        for layer in self.read_layers:
            for kind in ("keys", "values"):
                x = self.memory.token_rows(kind, layer, held).to(device=self.device, dtype=wire)
                if group is not None:  # zeros where another rank holds the token
                    full = torch.zeros(x.shape[0], tokens.numel(), x.shape[2], dtype=x.dtype, device=x.device)
                    full[:, mine.to(x.device)] = x
                    x = full
                rows.append(x)
        if group is not None:
            rows = group.fetch_sum(rows)
        rows = [x.to(self.dtype) for x in rows]
        return {layer: (rows[2 * i], rows[2 * i + 1]) for i, layer in enumerate(self.read_layers)}


class _PassDone(Exception):
    """Raised after the last layer a block selection needs."""


def _stop_pass(*_) -> None:
    raise _PassDone


def select_blocks(
    model: PreTrainedModel,
    prompts: list[list[int]],
    positions: list[list[int]],
    plans: list[BlockPlan | None],
    groups: list[torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """One forward pass without memory over the prompts (left-padded into one batch): per prompt with a plan, the
    mass (groups, blocks) its retrieval heads gave each block, else None. `groups[i]` (len(prompts[i]),) assigns
    every row to a group (-1: none); by default the rows after the prompt's head form group 0 and the mass is
    returned as (blocks,)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    pos = torch.zeros((len(prompts), width), dtype=torch.long)
    selections: list[BlockSelection | None] = []
    for i, (p, q, plan) in enumerate(zip(prompts, positions, plans)):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        pos[i, width - len(p) :] = torch.tensor(q)
        if plan is None:
            selections.append(None)
            continue
        if groups is None:
            group = torch.full((len(p),), -1, dtype=torch.long)
            asking = range(len(p))[plan.insert if plan.select_from is None else plan.select_from : plan.select_to]
            group[choosing_rows(asking)] = 0
            n_groups = 1
        else:
            group, n_groups = groups[i], int(groups[i].max()) + 1
        row_group = torch.cat([torch.full((width - len(p),), -1, dtype=torch.long), group])
        selections.append(plan.selection(row_group, max(1, n_groups)))
    session = Session(selection=selections)
    # the layers after the last one with retrieval heads cannot change the scores: the pass stops there
    last = max((max(s.heads, default=-1) for s in selections if s is not None), default=-1)
    modules = attention_modules(model)
    hook = modules[last].register_forward_hook(_stop_pass) if 0 <= last < len(modules) - 1 else None
    try:
        with session.active(), torch.inference_mode():
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                             use_cache=False)  # fmt: skip
    except _PassDone:
        pass
    finally:
        if hook is not None:
            hook.remove()
    out: list[torch.Tensor | None] = []
    for sel in selections:
        if sel is None:
            out.append(None)
            continue
        mass = sel.mass if sel.mass is not None else torch.zeros(sel.groups, sel.num_blocks)
        out.append(mass[0] if groups is None else mass)
    return out


def choosing_rows(asking: range, most: int = CHOOSING_ROWS) -> torch.Tensor:
    """The rows of the question (`asking`) whose retrieval heads choose blocks: all of them, or `most` evenly
    spaced ones (the first and the last included)."""
    rows = torch.tensor(asking, dtype=torch.long)
    if len(rows) <= most:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, most).round().long().unique()]


@dataclass(frozen=True)
class Relevance:
    """How much of the retrieval heads' mass unrelated questions give each block of one memory: its mean and
    spread. Lists, bibliographies and a document's opening draw every question; the passage a question is about
    draws that question far beyond its usual share. A block's relevance is its share in spreads above the mean."""

    mean: torch.Tensor  # (blocks,)
    spread: torch.Tensor  # (blocks,) > 0

    def score(self, mass: torch.Tensor) -> torch.Tensor:
        total = float(mass.sum())
        if total <= 0:
            return torch.full_like(self.mean, float("-inf"))
        return (mass / total - self.mean) / self.spread
