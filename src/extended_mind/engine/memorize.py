"""Memorization: one pass of the unmodified model over each document, recording every layer's keys and values.

The reference re-runs a full window for every `stride` new tokens (about 6x the work of one pass). Here each chunk
of `stride` new tokens attends to the previous `window - stride` tokens through a KV cache rebuilt from the keys
already recorded (re-rotated to positions 0..c-1), so every token goes through the model exactly once. The first
chunk is a full window starting at position 0, as in the reference, and its rotary tables cover every position
later chunks use.

Attention sinks: models park much of their attention on the first token of a sequence. A window recomputed from
scratch (the reference) gets a fresh sink; a re-rotated context does not, and later chunks then drift. So every
document starts with a special token (BOS, else EOS) that stays at position 0 in the context of every chunk, and,
being special, is never stored as a memory.

Chat head: a model with a chat template reads text pasted into a user's message after the template's head (system
prompt, user turn's opening). Its documents are memorized after that head instead (the head stays in the context of
every chunk, like the sink, and is never stored), so a block read in a user's message is what pasting it there
gives, and SmolLM2 answers from it more often in both prompt forms (docs/evaluation.md, "Memorized after the chat
head"). $EXTENDED_MIND_MEMORIZE_CONTEXT=sink memorizes after the sink alone, as before; each document records which
(`Segment.context`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from extended_mind.attention.patching import attention_modules
from extended_mind.attention.session import Session
from extended_mind.base.compat import with_cache
from extended_mind.base.documents import Document
from extended_mind.base.errors import DocumentError, ExtendedMindError
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.rope import apply_rope, invert_rope
from extended_mind.memory.memory import Memory
from extended_mind.memory.precision import check_storage, storage_of
from extended_mind.memory.segment import RopeTables, Segment, longest_rope
from extended_mind.memory.sharded import least_loaded
from extended_mind.parallel.group import ShardGroup


def validate_window(stride: int, window: int) -> None:
    if not isinstance(window, int) or window < 2:
        raise ExtendedMindError(f"window must be an integer >= 2, got {window!r}")
    if not isinstance(stride, int) or not 0 < stride < window:
        raise ExtendedMindError(f"stride must be an integer with 0 < stride < window ({window}), got {stride!r}")


class _DocumentPass:
    """Runs one document through the model chunk by chunk and keeps its keys (rotation undone) and values."""

    def __init__(self, model: PreTrainedModel, n_tokens: int, store_dtype: torch.dtype):
        self.model = model
        self.n = n_tokens
        self.dtype = store_dtype
        n_layers = len(attention_modules(model))
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.rope: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.start = 0

    def _capture(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        # key/value: (1, H, s, D) for the new tokens; cos/sin: (1, s, R) at their positions
        k_pre = invert_rope(key[0].float(), cos[0], sin[0]).to(self.dtype)
        if self.keys[layer] is None:
            h, _, d = k_pre.shape
            self.keys[layer] = torch.empty(h, self.n, d, dtype=self.dtype, device=key.device)
            self.values[layer] = torch.empty(h, self.n, value.shape[-1], dtype=self.dtype, device=key.device)
        end = self.start + key.shape[2]
        self.keys[layer][:, self.start : end] = k_pre
        self.values[layer][:, self.start : end] = value[0].to(self.dtype)
        if self.start == 0:
            self.rope[layer] = (cos[0].float(), sin[0].float())

    def run_chunk(self, ids: torch.Tensor, start: int, context: int, sink: int) -> None:
        """Process tokens ids[start:start+s] at positions context..context+s-1, after a context made of the first
        `sink` tokens of the document and the `context - sink` tokens just before `start`."""
        self.start = start
        cache = DynamicCache(config=self.model.config)
        ctx = torch.cat([torch.arange(min(sink, context)), torch.arange(start - context + min(sink, context), start)])
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if context and k is not None:
                cos, sin = self.rope[layer]
                idx = ctx.to(k.device)
                k_ctx = apply_rope(k[:, idx].float(), cos[:context], sin[:context])
                cache.update(k_ctx.to(k.dtype)[None], v[:, idx][None], layer)
        s = ids.shape[0]
        positions = torch.arange(context, context + s, device=ids.device)[None]
        session = Session(capture=self._capture)
        with session.active():
            self.model.base_model(input_ids=ids[None], position_ids=positions, use_cache=True,
                                  **with_cache(self.model.base_model, cache))  # fmt: skip


@dataclass
class EncodedDocument:
    """A document's token ids, their character spans, and which tokens enter memory (special tokens do not)."""

    ids: torch.Tensor  # (n,) long
    offsets: torch.Tensor  # (n, 2) int32
    keep: torch.Tensor  # (n,) bool
    context: str = "sink"  # what precedes the document's tokens: the sink alone, or the chat template's head


CONTEXT_ENV = "EXTENDED_MIND_MEMORIZE_CONTEXT"  # "sink": documents memorized after the sink alone


def chat_head(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The chat template's tokens before a user's message (system prompt included), or None: no chat template, a
    template that puts nothing there, or $EXTENDED_MIND_MEMORIZE_CONTEXT=sink."""
    if os.environ.get(CONTEXT_ENV, "chat") == "sink" or not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063MEMORY\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render one user message: the sink alone
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    head = tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]
    return head or None


def sink_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token that starts every memorized document (see module docstring): BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def encode_documents(tokenizer: PreTrainedTokenizerBase, documents: list[Document]) -> list[EncodedDocument]:
    """Each document's tokens after the chat template's head (`chat_head`), else after the sink token."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    sink, head = sink_token_id(tokenizer), chat_head(tokenizer)
    encoded = []
    for doc in documents:
        enc = tokenizer(doc.text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        if head is not None:  # the head replaces the document's own leading special tokens (a BOS is in the head)
            lead = next((i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids), len(ids))
            ids, spans = [*head, *ids[lead:]], [(0, 0)] * len(head) + list(spans[lead:])
        elif sink is not None and (not ids or ids[0] not in tokenizer.all_special_ids):
            ids, spans = [sink, *ids], [(0, 0), *spans]
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = ~torch.isin(ids_t, special)
        if head is not None:
            keep[: len(head)] = False  # the head's words are context, never memories
        if not bool(keep.any()):
            raise DocumentError(f"document {doc.id!r} has no tokens to memorize")
        encoded.append(EncodedDocument(ids_t, torch.tensor(spans, dtype=torch.int32).view(-1, 2), keep,
                                       "sink" if head is None else "chat"))  # fmt: skip
    return encoded


def memorize_encoded(
    model: PreTrainedModel,
    documents: list[Document],
    encoded: list[EncodedDocument],
    *,
    stride: int,
    window: int,
    identity: ModelIdentity,
    storage: str | None = None,
    progress: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Memory:
    """Memorize already tokenized documents (see `encode_documents`), one segment per document, keys and values
    kept in `storage` precision (default: the model's dtype). `on_progress(done, total)` is called after every
    chunk with token counts (an exception raised there stops memorization)."""
    validate_window(stride, window)
    device = next(model.parameters()).device
    compute_dtype = next(model.parameters()).dtype
    storage = check_storage(storage or storage_of(compute_dtype))
    total = sum(len(e.ids) for e in encoded)
    show = progress if progress is not None else total > 2 * window
    segments: list[Segment] = []
    rope_per_layer: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    kv_shapes: list[tuple[int, int, int]] = []
    done = 0
    with torch.inference_mode(), tqdm(total=total, unit="tok", desc="memorizing", disable=not show) as bar:
        for doc, enc in zip(documents, encoded):
            ids, offsets, keep = enc.ids, enc.offsets, enc.keep
            n = len(ids)
            run = _DocumentPass(model, n, compute_dtype)
            pos = torch.empty(n, dtype=torch.int32)
            first = min(window, n)
            sink = int((~keep).long().cumprod(0).sum())  # leading special tokens: the attention sink
            starts = [0, *range(first, n, stride)]
            for start in starts:
                end = first if start == 0 else min(start + stride, n)
                context = 0 if start == 0 else min(window - stride, start)
                run.run_chunk(ids[start:end].to(device), start, context, sink)
                pos[start:end] = torch.arange(context, context + end - start, dtype=torch.int32)
                bar.update(end - start)
                done += end - start
                if on_progress is not None:
                    on_progress(done, total)
            if any(r is None for r in run.rope):
                raise ExtendedMindError("some attention layers received no rotary embeddings; unsupported model")
            keep_dev = keep.to(device)
            keys = [k[:, keep_dev] for k in run.keys]
            values = [v[:, keep_dev] for v in run.values]
            segments.append(Segment.build(doc, keys, values, pos[keep], offsets[keep], stride, window, storage,
                                          enc.context))  # fmt: skip
            kv_shapes = [(k.shape[0], k.shape[2], v.shape[2]) for k, v in zip(keys, values)]
            if rope_per_layer is None or run.rope[0][0].shape[0] > rope_per_layer[0][0].shape[0]:
                rope_per_layer = run.rope

    # Layers share rotary tables (Gemma 3 has two kinds): store each distinct table once.
    rope_cos, rope_sin, layer_rope = [], [], []
    for cos, sin in rope_per_layer:
        for t, (c, s) in enumerate(zip(rope_cos, rope_sin)):
            if c.shape == cos.shape and torch.equal(c, cos.cpu()) and torch.equal(s, sin.cpu()):
                layer_rope.append(t)
                break
        else:
            layer_rope.append(len(rope_cos))
            rope_cos.append(cos.cpu())
            rope_sin.append(sin.cpu())
    return Memory(identity, segments, RopeTables(rope_cos, rope_sin, layer_rope, kv_shapes), stride, window, storage)


def memorize_sharded(
    group: ShardGroup,
    docs: list,
    memorize: Callable[[list], Memory],
    loads: list[int],
    owners: list[int] | None = None,
) -> tuple[list[Segment], RopeTables]:
    """Memorize new documents of a sharded memory: each goes to the least loaded rank (by `loads`, tokens per rank;
    or to `owners`), which memorizes it with `memorize(docs) -> Memory`; the other ranks get its positions and spans
    only. Returns (segments in the order of `docs`, the longest rotary tables any rank used)."""

    loads = list(loads)
    if owners is None:
        owners = []
        for d in docs:
            owners.append(least_loaded(loads))
            loads[owners[-1]] += max(1, len(d.text) // 4)  # an estimate: token counts are known after memorizing
    local: list = []
    rope: list = []

    def memorize_mine() -> tuple[list[tuple], RopeTables | None]:
        picked = [d for d, r in zip(docs, owners) if r == group.rank]
        if picked:
            memory = memorize(picked)
            local.extend(memory.segments)
            rope.append(memory.rope)
        described = [(s.num_tokens, s.stride, s.window, s.storage, s.tensors["positions"], s.tensors["spans"],
                      s.context) for s in local]  # fmt: skip
        return described, rope[0] if rope else None

    parts = group.everywhere(memorize_mine, "memorizing documents")
    described = [list(d) for d, _ in parts]
    out = []
    for d, r in zip(docs, owners):
        n, stride, window, storage, positions, spans, context = described[r].pop(0)
        if r == group.rank:
            s = local.pop(0)
            s.rank = r
        else:
            s = Segment(d, n, stride, window, storage, {"positions": positions, "spans": spans}, rank=r, remote=True,
                        context=context)  # fmt: skip
        out.append(s)
    return out, longest_rope([r for _, r in parts if r is not None])
