"""Correctness oracles on tiny random models of every supported family.

- top-k 0 (or no memory) is the unmodified model: same logits, same greedy tokens;
- retrieving every memory, with memories at their document positions and the prompt right after them, equals
  attention over the full context (document + prompt) in one pass;
- chunked memorization (context rebuilt from stored keys) equals recomputing each window from scratch.
"""

from __future__ import annotations

import torch

from extended_mind.documents import Document
from extended_mind.memorize import EncodedDocument, memorize_encoded

# Full-context equality is exact in real arithmetic; float32 reassociation (one softmax over memory + local
# instead of one over the concatenation) leaves differences around 1e-6 on these tiny models.
FULL_CONTEXT_ATOL = 1e-4


def raw_document(ids: torch.Tensor, sink: bool = False) -> EncodedDocument:
    """Token ids memorized as they are; with `sink`, the first token is the (unstored) attention sink."""
    n = len(ids)
    keep = torch.ones(n, dtype=torch.bool)
    keep[0] = not sink
    return EncodedDocument(ids, torch.zeros(n, 2, dtype=torch.int32), keep)


def memorize_ids(mind, docs: list[torch.Tensor], stride: int = 16, window: int = 64, sink: bool = False):
    return memorize_encoded(
        mind.model,
        [Document(f"d{i}", "x") for i in range(len(docs))],
        [raw_document(d, sink) for d in docs],
        stride=stride,
        window=window,
        identity=mind.identity,
        progress=False,
    )


def test_topk_zero_is_the_unmodified_model(tiny_pair):
    mind, reference = tiny_pair
    torch.manual_seed(1)
    memory = memorize_ids(mind, [torch.randint(0, 256, (90,))])
    prompt = torch.randint(0, 256, (1, 24))
    with torch.inference_mode():
        expected = reference(prompt).logits
    for mem in (None, memory):
        got = mind.logits(prompt, memory=mem, topk=0, position_policy="zero")
        assert torch.equal(got, expected)
    with torch.inference_mode():
        greedy = reference.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 24:].tolist()
    result = mind.generate(prompt[0].tolist(), memory=memory, topk=0, position_policy="zero", max_new_tokens=8)
    assert [t.id for t in result.tokens] == greedy


def test_all_memories_at_document_positions_equal_full_context(tiny_pair):
    mind, reference = tiny_pair
    torch.manual_seed(2)
    doc = torch.randint(0, 256, (48,))
    prompt = torch.randint(0, 256, (1, 20))
    memory = memorize_ids(mind, [doc], window=64)  # one window: memories keep positions 0..47
    assert memory.positions.tolist() == list(range(48))
    with torch.inference_mode():
        expected = reference(torch.cat([doc[None], prompt], dim=1)).logits[:, 48:]
    got = mind.logits(prompt, memory=memory, topk=48, position_policy="stored")
    assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL
    # and fewer memories really do change the result (the oracle is not vacuous)
    fewer = mind.logits(prompt, memory=memory, topk=2, position_policy="stored")
    assert (fewer - expected).abs().max().item() > 1e-3


def test_chunked_memorization_equals_recomputed_windows(tiny_pair):
    mind, _ = tiny_pair
    torch.manual_seed(3)
    sink = torch.tensor([256])  # <s>, kept at position 0 of every chunk's context
    doc = torch.cat([sink, torch.randint(0, 256, (150,))])
    window, stride = 64, 16
    chunked = memorize_ids(mind, [doc], stride=stride, window=window, sink=True)
    # Recompute the window of the chunk starting at token 96 from scratch: sink + the 47 tokens before + 16 new.
    start, context = 96, window - stride
    window_ids = torch.cat([doc[:1], doc[start - context + 1 : start], doc[start : start + stride]])
    fresh = memorize_ids(mind, [window_ids], stride=stride, window=window, sink=True)
    # memory index of doc token t is t - 1 (the sink is not stored)
    for layer in range(chunked.num_layers):
        a = chunked.keys[layer][:, start - 1 : start - 1 + stride]
        b = fresh.keys[layer][:, -stride:]
        assert (a - b).abs().max().item() < 1e-4
        assert (
            chunked.values[layer][:, start - 1 : start - 1 + stride] - fresh.values[layer][:, -stride:]
        ).abs().max() < 1e-4
    assert chunked.positions[start - 1 : start - 1 + stride].tolist() == list(range(context, context + stride))
