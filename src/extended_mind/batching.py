"""Batched generation: several prompts decoded together, each with its own memory (or none).

The model's dense layers run on the whole batch (left-padded, with an attention mask and per-row positions, so
a prompt whose memory shifts its positions keeps them); memory retrieval runs per row inside attention
(`Session.rows`). Each row stops on its own; finished rows keep a place in the batch until all are done. Greedy
rows give the tokens they give alone, up to float rounding differences between batched and unbatched matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .attention import LayerMemory, RetrievalSettings, Session
from .blocks import BlockPlan, select_blocks
from .citations import cite, sparse_sum
from .compat import with_cache
from .generation import (
    DecodeSettings,
    GeneratedToken,
    GenerationResult,
    biased,
    entropy,
    next_piece,
    next_token,
    stop_token_ids,
    token_logprobs,
)
from .memory import Memory


@dataclass
class BatchRow:
    prompt_ids: list[int]
    memory: Memory | None
    layers: dict[int, LayerMemory]
    offset: int  # first position of the prompt (after the memory's positions under the "stored" policy)
    plan: BlockPlan | None = None  # block memory: slots chosen by a pass over the prompt without memory

    def positions(self) -> list[int]:
        if self.plan is not None:
            return self.plan.positions(len(self.prompt_ids))
        return list(range(self.offset, self.offset + len(self.prompt_ids)))


def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[BatchRow], s: DecodeSettings
) -> list[GenerationResult]:
    device = next(model.parameters()).device
    n = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        m = len(r.prompt_ids)
        ids[i, width - m :] = torch.tensor(r.prompt_ids)
        mask[i, width - m :] = 1
        positions[i, width - m :] = torch.tensor(r.positions())
    row_layers = [r.layers for r in rows]
    if any(r.plan is not None for r in rows):
        prompts, plans = [r.prompt_ids for r in rows], [r.plan for r in rows]
        masses = select_blocks(model, prompts, [r.positions() for r in rows], plans)
        row_layers = [r.plan.slots(r.plan.choose(m)) if r.plan is not None else r.layers for r, m in zip(rows, masses)]
    session = Session(
        settings=RetrievalSettings(s.topk, s.ranking, s.similarity_threshold),
        record_citations=any(row_layers),
        citation_weighting=s.citation_weighting,
        rows=row_layers,
    )
    n_heads = model.config.num_attention_heads
    cache = DynamicCache(config=model.config)

    def forward(input_ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        session.row_citations = [[] for _ in rows]
        session.row_positions = pos.to(device)
        with session.active(), torch.inference_mode():
            out = model(
                input_ids=input_ids.to(device),
                position_ids=pos.to(device),
                attention_mask=attn.to(device),
                **with_cache(model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()

    def row_citations(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        records = session.row_citations[i]
        idx, w = sparse_sum([r[0] for r in records], [r[1] for r in records])
        return idx.cpu(), (w / (len(records) * n_heads)).cpu() if records else w.cpu()

    stop_ids = stop_token_ids(model, tokenizer)
    generators = [torch.Generator().manual_seed(s.seed) if s.seed is not None else None for _ in rows]
    generated: list[list[int]] = [[] for _ in rows]
    tokens: list[list[GeneratedToken]] = [[] for _ in rows]
    texts = [""] * n
    finish = ["length"] * n
    done = [False] * n
    logits = forward(ids, positions, mask)
    position = positions[:, -1].clone()
    for step in range(s.max_new_tokens):
        last = step + 1 == s.max_new_tokens
        next_ids = torch.full((n, 1), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if done[i]:
                continue
            token = next_token(biased(logits[i], s.logit_bias), s.temperature, generators[i])
            if token in stop_ids:
                done[i], finish[i] = True, "stop"
                continue
            generated[i].append(token)
            piece, texts[i], hit = next_piece(tokenizer, generated[i], texts[i], s.stop, last)
            idx, w = row_citations(i)
            citations = cite(r.memory, idx, w, max_spans=3) if r.memory is not None and len(idx) else []
            h = entropy(logits[i])
            logprob, top = token_logprobs(logits[i], token, s.top_logprobs)
            tokens[i].append(GeneratedToken(token, piece, h, s.topk, citations, memory_indices=idx, memory_weights=w,
                                            logprob=logprob, top_logprobs=top))  # fmt: skip
            if hit >= 0:
                done[i], finish[i] = True, "stop"
            next_ids[i, 0] = token
        if all(done) or last:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        position = position + 1
        logits = forward(next_ids, position[:, None], mask)

    results = []
    for i, r in enumerate(rows):
        citations = []
        if r.memory is not None and tokens[i]:
            all_idx, all_w = sparse_sum([t.memory_indices for t in tokens[i]], [t.memory_weights for t in tokens[i]])
            citations = cite(r.memory, all_idx, all_w / len(tokens[i]))
        results.append(
            GenerationResult(
                text=texts[i],
                tokens=tokens[i],
                citations=citations,
                retrievals=[],
                prompt_tokens=len(r.prompt_ids),
                finish_reason=finish[i],
            )
        )
    return results
