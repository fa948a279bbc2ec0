"""Continuous batching: rows that join a running batch at different steps, with their own memories and options,
get the tokens and citations they get alone; finished and cancelled rows leave."""

from __future__ import annotations

import pytest
import torch

from extended_mind import ExtendedMind
from extended_mind.engine.batching import BatchRow, DecodeBatch, can_merge
from tests.conftest import byte_tokenizer, tiny_model

REQUESTS = [
    ("The cat sat on the", "cats", dict(max_new_tokens=7)),
    ("A much longer prompt about ships and the sea, to pad the others", None, dict(max_new_tokens=3)),
    ("Rain fell for", "rain", dict(max_new_tokens=9, retrieval="tokens", topk=4)),
    ("Rain", "rain", dict(max_new_tokens=5, temperature=0.8, seed=7, retrieval="tokens", topk=4)),
]


def _row(stream) -> BatchRow:
    return BatchRow(stream.prompt_ids, stream.memory, stream.layers, stream.offset, stream.plan)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_rows_joining_a_running_batch_answer_as_alone(family):
    mind = ExtendedMind(tiny_model(family), byte_tokenizer(), f"tiny-{family}")
    memories = {
        "cats": mind.memorize(["The cat sat on the mat. It was a red mat.", "Cats sleep sixteen hours a day."]),
        "rain": mind.memorize(["Rain fell for nine days in the valley of Oru."]),
    }
    alone = [mind.generate(p, memory=memories.get(m), chat=False, **o) for p, m, o in REQUESTS]
    batch = DecodeBatch(mind.model, mind.tokenizer, max_batch=4)
    got: dict[int, list] = {i: [] for i in range(len(REQUESTS))}
    for i, (p, m, o) in enumerate(REQUESTS):
        stream = mind.stream(p, memory=memories.get(m), chat=False, **o)
        assert batch.compatible(stream.settings) == (i != 2)  # another top-k: waits for a batch of its own
        if i == 2:
            while len(batch):  # it waits for the batch to drain, then starts one
                batch.step()
        batch.join(_row(stream), stream.settings, got[i].append, lambda: False)
        batch.step()  # one step before the next request arrives
    while len(batch):
        batch.step()
    for i, expected in enumerate(alone):
        tokens, result = got[i][:-1], got[i][-1]
        assert [t.id for t in tokens] == [t.id for t in expected.tokens], REQUESTS[i]
        assert result.text == expected.text and result.finish_reason == expected.finish_reason
        assert [c.text for c in result.citations] == [c.text for c in expected.citations]
        for a, b in zip(tokens, expected.tokens):
            assert abs(a.logprob - b.logprob) < 1e-4


def test_a_cancelled_row_leaves_and_the_others_go_on(tiny_mind):
    batch = DecodeBatch(tiny_mind.model, tiny_mind.tokenizer)
    gone = {"flag": False}
    out: dict[str, list] = {"a": [], "b": []}
    for name, cancelled in (("a", lambda: gone["flag"]), ("b", lambda: False)):
        stream = tiny_mind.stream(f"prompt {name}", chat=False, max_new_tokens=6)
        batch.join(_row(stream), stream.settings, out[name].append, cancelled)
    batch.step()
    gone["flag"] = True
    batch.step()
    assert len(batch) == 1 and batch.cache.layers[0].keys.shape[0] == 1
    while len(batch):
        batch.step()
    assert len(out["a"]) == 2 and len(out["b"]) == 7  # a: one token and its result; b: six tokens and its result
    expected = tiny_mind.generate("prompt b", chat=False, max_new_tokens=6)
    assert [t.id for t in out["b"][:-1]] == [t.id for t in expected.tokens]


@pytest.mark.parametrize("family", ["gemma3", "mpt"])
def test_rows_that_start_together_on_unmergeable_models_answer_as_alone(family):
    # finished rows keep their place, fed padding, until all are done
    mind = ExtendedMind(tiny_model(family), byte_tokenizer(), f"tiny-{family}")
    memory = mind.memorize(["The ship sailed at dawn. Its captain was Ada."])
    asks = [("Who was the captain", memory, 2), ("A longer question about the sea", None, 7), ("Ship", memory, 5)]
    alone = [mind.generate(p, memory=m, chat=False, max_new_tokens=n, retrieval="tokens") for p, m, n in asks]
    batch = DecodeBatch(mind.model, mind.tokenizer)
    out: list[list] = [[] for _ in asks]
    streams = [mind.stream(p, memory=m, chat=False, max_new_tokens=n, retrieval="tokens") for p, m, n in asks]
    batch.join_many([(_row(t), t.settings, out[i].append, lambda: False) for i, t in enumerate(streams)])
    while len(batch):
        batch.step()
    for got, expected in zip(out, alone):
        assert [t.id for t in got[:-1]] == [t.id for t in expected.tokens]


def test_sliding_window_and_alibi_models_run_rows_one_at_a_time():
    assert can_merge(tiny_model("llama"))
    assert not can_merge(tiny_model("gemma3")) and not can_merge(tiny_model("mpt"))
    mind = ExtendedMind(tiny_model("gemma3"), byte_tokenizer(), "tiny-gemma3")
    batch = DecodeBatch(mind.model, mind.tokenizer)
    stream = mind.stream("one", chat=False, max_new_tokens=2)
    batch.join(_row(stream), stream.settings, lambda x: None, lambda: False)
    assert not batch.compatible(mind.stream("two", chat=False, max_new_tokens=2).settings)
    torch.manual_seed(0)


def test_rows_prefilled_together_answer_as_alone(tiny_mind):
    memory = tiny_mind.memorize(["The ship sailed at dawn. Its captain was Ada.", "Rain fell for nine days."])
    asks = [("Who was the captain", memory, 6), ("Rain", None, 4), ("A longer question about the ship", memory, 5)]
    alone = [tiny_mind.generate(p, memory=m, chat=False, max_new_tokens=n) for p, m, n in asks]
    batch = DecodeBatch(tiny_mind.model, tiny_mind.tokenizer)
    out: list[list] = [[] for _ in asks]
    streams = [tiny_mind.stream(p, memory=m, chat=False, max_new_tokens=n) for p, m, n in asks]
    batch.join_many([(_row(t), t.settings, out[i].append, lambda: False) for i, t in enumerate(streams)])
    while len(batch):
        batch.step()
    for got, expected in zip(out, alone):
        assert [t.id for t in got[:-1]] == [t.id for t in expected.tokens]
        assert [c.text for c in got[-1].citations] == [c.text for c in expected.citations]


@pytest.mark.parametrize("options", [dict(), dict(retrieval="tokens", topk=4)])
def test_a_long_prompt_joining_is_prefilled_in_chunks_while_the_running_rows_go_on(options):
    """With `prefill_chunk`, a long prompt that joins a running batch is prefilled a chunk per step: the running
    row gets a token at every one of those steps, and both answer as they do alone."""
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    memory = mind.memorize(["The cat sat on the mat. It was a red mat.", "Rain fell for nine days in Oru."])
    short, long = "The cat sat", "A much longer prompt about the cat and the mat and the rain, " * 2
    asks = [(short, dict(max_new_tokens=30, **options)), (long, dict(max_new_tokens=6, **options))]
    alone = [mind.generate(p, memory=memory, chat=False, block_relevance=0.0, **o) for p, o in asks]
    batch = DecodeBatch(mind.model, mind.tokenizer, max_batch=4, prefill_chunk=16)
    got: list[list] = [[], []]
    for i, (p, o) in enumerate(asks):
        stream = mind.stream(p, memory=memory, chat=False, block_relevance=0.0, **o)
        batch.join(_row(stream), stream.settings, got[i].append, lambda: False)
        if i == 0:
            batch.step()
    assert len(batch.prefilling) == 1 and len(batch) == 2
    chunks = -(-len(batch.prefilling[0].live.row.prompt_ids) // 16)  # the prompt as its layout reads it
    assert chunks >= 5
    for step in range(chunks):
        before = len(got[0])
        batch.step()
        assert len(got[0]) == before + 1  # the running row never waits for the whole prompt
        assert len(batch.prefilling) == (0 if step == chunks - 1 else 1)
    while len(batch):
        batch.step()
    for out, expected in zip(got, alone):
        assert [t.id for t in out[:-1]] == [t.id for t in expected.tokens]
        assert out[-1].text == expected.text
        assert [c.text for c in out[-1].citations] == [c.text for c in expected.citations]


def test_a_prompt_cancelled_while_prefilled_in_chunks_leaves_at_the_next_step(tiny_mind):
    """Its client gone, a prompt still being prefilled chunk by chunk is not prefilled to the end: it leaves at the
    next step with its (empty) result, and the running row goes on alone."""
    batch = DecodeBatch(tiny_mind.model, tiny_mind.tokenizer, max_batch=4, prefill_chunk=16)
    running = tiny_mind.stream("The cat sat", chat=False, max_new_tokens=12)
    joining = tiny_mind.stream("A much longer prompt about the cat and the mat, " * 3, chat=False, max_new_tokens=6)
    got: list[list] = [[], []]
    gone = [False]
    batch.join(_row(running), running.settings, got[0].append, lambda: False)
    batch.step()
    batch.join(_row(joining), joining.settings, got[1].append, lambda: gone[0])
    chunks = -(-len(joining.prompt_ids) // 16)
    assert chunks >= 5
    batch.step()  # its first chunk
    assert len(batch.prefilling) == 1
    forwards = []
    forward = batch._forward
    batch._forward = lambda rows, *a: forwards.append(len(rows)) or forward(rows, *a)
    gone[0] = True
    batch.step()
    assert not batch.prefilling and len(batch) == 1
    assert forwards == [1]  # the running row's step only: no more chunks of the cancelled prompt
    assert len(got[1]) == 1 and got[1][0].tokens == [] and got[1][0].finish_reason == "stop"
    while len(batch):
        batch.step()
    assert len(got[0]) == 12 + 1  # the running row's tokens, then its result


def test_prefill_chunk_must_be_positive(tiny_mind):
    with pytest.raises(ValueError, match="prefill_chunk"):
        DecodeBatch(tiny_mind.model, tiny_mind.tokenizer, prefill_chunk=0)
