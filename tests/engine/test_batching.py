"""Batched generation with a memory per prompt equals generating the prompts one by one; a decode step's memory
use does not grow with the prompt beyond the local cache."""

from __future__ import annotations

import pytest
import torch

from extended_mind import ExtendedMind, ExtendedMindError
from extended_mind.engine.batching import DecodeBatch, can_merge
from extended_mind.engine.layouts import SURE_TOKENS
from extended_mind.retrieval import exact as exact_module
from tests.attention.test_oracles import SINK_CHAT_TEMPLATE

CATS = "The cat sat on the mat. It was a red mat with green stripes. The cat was called Orlo."
SHIPS = "Ships sail at dawn. The captain of the Meridian is Ada Vance. She has sailed for thirty years."
PROMPTS = ["Where did the cat sit?", "Who is the captain?", "Hello", "A much longer prompt than the others, to pad it."]


@pytest.mark.parametrize("policy", ["stored", "zero", "blocks"])
def test_batch_equals_one_by_one(tiny_pair, policy):
    mind, _ = tiny_pair
    cats = mind.memorize(CATS, ids=["cats"])
    ships = mind.memorize(SHIPS, ids=["ships"])
    memories = [cats, ships, None, [cats, ships]]
    if policy == "blocks":  # block memory: each prompt's own selection pass, slots and positions
        # (relevance 0: a tiny random model's questions are relevant to nothing, and would read no block at all)
        options = dict(max_new_tokens=8, chat=False, topk=3, blocks=2, block_size=16, block_relevance=0.0)
    else:
        options = dict(max_new_tokens=8, chat=False, topk=3, retrieval="tokens", position_policy=policy)
    alone = [mind.generate(p, memory=m, **options) for p, m in zip(PROMPTS, memories)]
    batch = mind.generate_batch(PROMPTS, memories, **options)
    for a, b in zip(alone, batch):
        assert [t.id for t in b.tokens] == [t.id for t in a.tokens]
        assert b.text == a.text and b.finish_reason == a.finish_reason
        assert b.blocks_read == a.blocks_read and b.passages == a.passages  # block memory read the same text
        for ta, tb in zip(a.tokens, b.tokens):  # the same attention mass went to memory at every step
            assert float(tb.memory_weights.sum()) == pytest.approx(float(ta.memory_weights.sum()), rel=1e-4, abs=1e-7)
        if policy == "zero":
            # all memory keys at position 0: a tiny model's first-layer keys of equal bytes are equal, and which of
            # the tied keys a top-k returns depends on the matmul's shape; only the spans can differ
            continue
        assert [(c.doc, c.start) for c in b.citations] == [(c.doc, c.start) for c in a.citations]
        for ca, cb in zip(a.citations, b.citations):
            assert cb.weight == pytest.approx(ca.weight, rel=1e-3, abs=1e-6)
    assert batch[2].citations == []  # the prompt without memory cites nothing
    if policy == "blocks":  # every prompt with a memory read blocks: the batch read slots row by row
        assert all(b.blocks_read for b, m in zip(batch, memories) if m is not None)


def test_batch_stop_strings_and_sampling(tiny_mind: ExtendedMind):
    memory = tiny_mind.memorize(CATS)
    options = dict(max_new_tokens=12, chat=False, temperature=0.8, seed=3)
    alone = [tiny_mind.generate(p, memory=memory, **options) for p in PROMPTS[:2]]
    stops = {alone[0].text[2:4]} - {""}
    batch = tiny_mind.generate_batch(PROMPTS[:2], [memory, memory], stop=sorted(stops), **options)
    again = [tiny_mind.generate(p, memory=memory, stop=sorted(stops), **options) for p in PROMPTS[:2]]
    assert [b.text for b in batch] == [a.text for a in again]
    assert batch[0].finish_reason == "stop" and len(batch[0].text) < len(alone[0].text)


def test_batch_input_errors(tiny_mind: ExtendedMind):
    with pytest.raises(ExtendedMindError, match="non-empty list"):
        tiny_mind.generate_batch([])
    with pytest.raises(ExtendedMindError, match="memories for"):
        tiny_mind.generate_batch(["a", "b"], [None])
    with pytest.raises(ExtendedMindError, match="not batched"):
        tiny_mind.generate_batch(["a"], uncertainty_threshold=1.0)


def test_decode_step_memory_does_not_grow_with_the_prompt(tiny_mind: ExtendedMind, monkeypatch):
    """The largest tensor a decode step's retrieval makes is (B, H, g, N) scores: it depends on the memory, not on
    the prompt; only the local cache grows with the prompt. Prefill scores come in blocks of bounded size."""
    memory = tiny_mind.memorize(CATS * 12)
    shapes: list[tuple[int, ...]] = []
    real_matmul = torch.matmul

    def recording(a, b, *args, **kwargs):
        out = real_matmul(a, b, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    largest = {}
    for n in (8, 200):
        prompt = list(range(40, 40 + n))
        stream = tiny_mind.stream(prompt, memory=memory, max_new_tokens=3, search="exact", retrieval="tokens")
        next(stream)  # prefill and first token
        monkeypatch.setattr(exact_module.torch, "matmul", recording)
        shapes.clear()
        next(stream)  # one decode step
        monkeypatch.undo()
        largest[n] = max(torch.Size(s).numel() for s in shapes if len(s) == 4 and s[-1] == memory.num_tokens)
        local = max(torch.Size(s).numel() for s in shapes if len(s) == 4 and s[-1] != memory.num_tokens)
        assert local <= 4 * (n + 3) * 4  # (B, H, g*1, Skv) local logits: linear in the prompt, no memory factor
    assert largest[8] == largest[200] == 2 * 2 * memory.num_tokens  # H=2 KV heads x g=2 query rows x N
    # prefill: score blocks are bounded by the block size, whatever the prompt length
    assert exact_module.SCORE_BLOCK >= 2 * memory.num_tokens


def test_a_greedy_batch_row_goes_on_from_its_layout_trial(tiny_pair, monkeypatch):
    """A chat-form row that reads blocks tries its layouts (engine/layouts.py); a greedy one then goes on from the
    kept trial's cache instead of prefilling its prompt again (where rows can share a cache), and answers as it does
    alone: tokens, log-probabilities, citations; with a stop string inside the trial's tokens too."""
    mind, _ = tiny_pair
    mind.tokenizer.chat_template = SINK_CHAT_TEMPLATE
    memory = mind.memorize(SHIPS + " " + CATS, progress=False)
    prompts = ["Who is the captain?", "Where did the cat sit?", "Hello"]
    memories = [memory, memory, None]
    options = dict(chat=True, max_new_tokens=SURE_TOKENS + 4, block_size=16, blocks=1, block_relevance=0.0,
                   block_words=0, block_break="surer", logit_bias={mind.tokenizer.eos_token_id: -100.0})  # fmt: skip
    alone = [mind.generate(p, memory=m, **options) for p, m in zip(prompts, memories)]
    assert alone[0].blocks_read and alone[1].blocks_read
    prefilled: list[int] = []
    prefill = DecodeBatch._prefill_together
    monkeypatch.setattr(DecodeBatch, "_prefill_together",
                        lambda self, live, key: prefilled.extend(r.answer.prompt_tokens for r in live)
                        or prefill(self, live, key))  # fmt: skip
    batch = mind.generate_batch(prompts, memories, **options)
    for a, b in zip(alone, batch):
        assert [t.id for t in b.tokens] == [t.id for t in a.tokens] and b.text == a.text
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, b.tokens)) < 1e-4
        assert [(c.doc, c.start) for c in b.citations] == [(c.doc, c.start) for c in a.citations]
        assert b.blocks_read == a.blocks_read
    reading = [b.prompt_tokens for b in batch[:2]]
    if can_merge(mind.model):  # only the row without memory was prefilled
        assert prefilled == [batch[2].prompt_tokens]
    else:  # rows that cannot share a cache start together, all prefilled
        assert sorted(prefilled) == sorted(reading + [batch[2].prompt_tokens])
    stop = alone[0].text[3:5]
    if stop.strip():
        [cut] = mind.generate_batch(prompts[:1], memories[:1], stop=[stop], **options)
        single = mind.generate(prompts[0], memory=memory, stop=[stop], **options)
        assert cut.text == single.text and cut.finish_reason == single.finish_reason == "stop"
        assert len(cut.tokens) < SURE_TOKENS
