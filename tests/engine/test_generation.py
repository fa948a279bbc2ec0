"""Generation on a tiny model: streaming, citations, stop strings and uncertainty-triggered retrieval."""

from __future__ import annotations

import bisect
import warnings

import pytest
import torch

from extended_mind import ExtendedMind
from extended_mind.engine.decoding import entropy
from extended_mind.memory.citations import cite, cite_answer
from tests.conftest import byte_tokenizer, tiny_model

DOC = "The pass key is 71234. Remember it. " * 3 + "Grass is green and the sky is blue. " * 6


def test_stream_yields_the_same_tokens_as_generate(tiny_mind):
    memory = tiny_mind.memorize(DOC)
    stream = tiny_mind.stream("What is the pass key?", memory=memory, max_new_tokens=6)
    streamed = [t.id for t in stream]
    result = tiny_mind.generate("What is the pass key?", memory=memory, max_new_tokens=6)
    assert streamed == [t.id for t in result.tokens] and len(streamed) == 6
    assert stream.result.text == result.text == "".join(t.text for t in result.tokens)


def test_citations_point_into_the_documents(tiny_mind):
    memory = tiny_mind.memorize([DOC, "Another document about rivers and lakes."], ids=["a", "b"])
    result = tiny_mind.generate("Tell me", memory=memory, max_new_tokens=5)
    assert result.citations, "memory attention always gives memory tokens some weight"
    texts = {"a": DOC, "b": "Another document about rivers and lakes."}
    for c in result.citations:
        assert c.doc in texts and 0 <= c.start < c.end <= len(texts[c.doc])
        assert c.text == texts[c.doc][c.start : c.end].strip() and c.weight > 0
    assert [c.weight for c in result.citations] == sorted((c.weight for c in result.citations), reverse=True)
    assert all(t.citations for t in result.tokens)  # per generated token too
    assert result.to_dict()["citations"][0].keys() == {"doc", "start", "end", "text", "weight"}


def test_stop_string_ends_the_answer(tiny_mind):
    full = tiny_mind.generate("Say something", max_new_tokens=12, topk=0)
    cut_at = full.text[3:6]
    assert cut_at
    stopped = tiny_mind.generate("Say something", max_new_tokens=12, topk=0, stop=[cut_at])
    assert stopped.text == full.text[: full.text.index(cut_at)]
    absent = "\x00never"  # a stop string that never occurs must not hide one that does
    both = tiny_mind.generate("Say something", max_new_tokens=12, topk=0, stop=[absent, cut_at])
    assert both.text == stopped.text


def test_uncertainty_threshold_off_changes_nothing(tiny_mind):
    """A threshold no step reaches changes nothing (token retrieval; block memory keeps room for the extra blocks,
    so its prompt positions shift)."""
    memory = tiny_mind.memorize(DOC)
    options = dict(memory=memory, topk=3, max_new_tokens=8, retrieval="tokens")
    base = tiny_mind.generate("Question?", **options)
    huge = tiny_mind.generate("Question?", **options, uncertainty_threshold=1e9)
    assert base.retrievals == [] and huge.retrievals == []
    assert [t.id for t in base.tokens] == [t.id for t in huge.tokens]


@pytest.mark.parametrize("retrieval", ["tokens", "blocks"])
def test_uncertainty_raises_k_on_high_entropy_steps(tiny_mind, retrieval):
    """k is top-k for token retrieval and the number of blocks read for block memory."""
    memory = tiny_mind.memorize(DOC)
    k, step = 2, 5

    def options(k: int) -> dict:
        if retrieval == "tokens":
            return dict(memory=memory, retrieval="tokens", topk=k, max_new_tokens=6)
        # an uncertainty retry reads the blocks before the question (block_break "auto" is "surer" with it)
        return dict(memory=memory, topk=4, blocks=k, block_size=8, max_new_tokens=6, block_relevance=0.0,
                    block_break="surer")

    # Threshold 0: every step is re-retrieved with k + step, so the whole run (cache included) must equal a plain
    # run with k + step: a strong check that cropping and recomputing leaves no trace of the first attempt.
    always = tiny_mind.generate("Question?", **options(k), topk_step=step, uncertainty_threshold=0.0)
    wider = tiny_mind.generate("Question?", **options(k + step))
    assert [t.id for t in always.tokens] == [t.id for t in wider.tokens]
    assert [r.step for r in always.retrievals] == list(range(6))
    assert all(r.topk == k and r.new_topk == k + step for r in always.retrievals)
    assert all(t.topk == k + step for t in always.tokens)
    # A threshold between the steps' entropies re-retrieves exactly the steps above it.
    entropies = [r.entropy for r in always.retrievals]
    plain = tiny_mind.generate("Question?", **options(k), topk_step=step, uncertainty_threshold=1e9)
    cut = sorted(t.entropy for t in plain.tokens)[3]
    some = tiny_mind.generate("Question?", **options(k), topk_step=step, uncertainty_threshold=cut)
    assert some.retrievals, entropies
    first = some.retrievals[0]
    assert first.entropy > cut and first.new_topk == k + step
    assert plain.tokens[first.step].entropy > cut
    assert all(plain.tokens[i].entropy <= cut for i in range(first.step))


def test_entropy_in_nats():
    assert abs(entropy(torch.zeros(4)) - torch.log(torch.tensor(4.0)).item()) < 1e-6
    assert entropy(torch.tensor([100.0, 0.0, 0.0])) < 1e-6


def test_attention_weighting_gives_memory_mass_per_token(tiny_mind):
    memory = tiny_mind.memorize(DOC)
    result = tiny_mind.generate("Tell me", memory=memory, max_new_tokens=4, citation_weighting="attention")
    for token in result.tokens:
        mass = float(token.memory_weights.sum())  # mean over layers and heads of the probability on memory
        assert 0 < mass <= 1 + 1e-5
    assert result.citations


def test_a_tiny_temperature_samples_the_greedy_token(tiny_mind):
    greedy = tiny_mind.generate("abc", max_new_tokens=5, chat=False)
    tiny = tiny_mind.generate("abc", max_new_tokens=5, chat=False, temperature=5e-324, seed=1)  # found by fuzzing
    assert [t.id for t in tiny.tokens] == [t.id for t in greedy.tokens]


def _cite_by_loop(memory, indices, weights, max_spans, min_share=0.1):
    """Sentence groups of weighted tokens, one token at a time (the previous implementation): the oracle for the
    vectorized `cite`. Returns (doc, start, end, weight) per span."""
    from extended_mind.memory.citations import _CONTEXT_CHARS, _MAX_SPAN_CHARS, _sentences

    groups: dict[tuple[int, int], list] = {}
    for t, w in zip(indices.tolist(), weights.tolist()):
        d = int(memory.token_doc[t])
        s, e = memory.token_spans[t].tolist()
        starts, _ = _sentences(memory.documents[d].text)
        i = max(0, bisect.bisect_right(starts, s) - 1)
        g = groups.setdefault((d, i), [0.0, s, e])
        g[0] += w
        g[1], g[2] = min(g[1], s), max(g[2], e)
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))[:max_spans]
    out = []
    for (d, i), (w, s, e) in ranked:
        if w < min_share * ranked[0][1][0]:
            break
        starts, ends = _sentences(memory.documents[d].text)
        lo, hi = starts[i], ends[i]
        if hi - lo > _MAX_SPAN_CHARS:
            lo, hi = max(lo, s - _CONTEXT_CHARS), min(hi, e + _CONTEXT_CHARS)
        out.append((memory.documents[d].id, lo, hi, w))
    return out


def test_vectorized_citations_match_token_by_token_grouping(tiny_mind):
    long_sentence = "word " * 120 + "end."  # a run-on sentence: cut around the cited tokens
    memory = tiny_mind.memorize([DOC, "Rivers. Lakes! Seas?\nOceans", long_sentence], ids=["a", "b", "c"])
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        indices = torch.randint(0, memory.num_tokens, (40,), generator=gen).unique()
        weights = torch.rand(len(indices), generator=gen)
        got = cite(memory, indices, weights, max_spans=5)
        expected = _cite_by_loop(memory, indices, weights, max_spans=5)
        assert [(c.doc, c.start, c.end) for c in got] == [x[:3] for x in expected], trial
        assert [c.weight for c in got] == pytest.approx([x[3] for x in expected], abs=1e-5)
        for c in got:
            text = {"a": DOC, "b": "Rivers. Lakes! Seas?\nOceans", "c": long_sentence}[c.doc]
            assert c.text == text[c.start : c.end].strip() and c.end - c.start <= 400 + 2 * 120


def test_answer_citations_are_the_cubic_mean_of_each_tokens_sentence_weights(tiny_mind):
    """Oracle for `cite_answer`: per answer token, its sentences' weights (the token-by-token grouping); per
    sentence, the cubic mean over the answer's tokens (0 where a token did not read it)."""
    from extended_mind.memory.citations import _sentences

    long_sentence = "word " * 120 + "end."
    memory = tiny_mind.memorize([DOC, "Rivers. Lakes! Seas?\nOceans", long_sentence], ids=["a", "b", "c"])
    texts = {"a": DOC, "b": "Rivers. Lakes! Seas?\nOceans", "c": long_sentence}

    def sentence(doc: str, start: int) -> tuple[str, int]:  # a run-on sentence's span starts inside it
        return doc, bisect.bisect_right(_sentences(texts[doc])[0], start) - 1

    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        indices = [torch.randint(0, memory.num_tokens, (30,), generator=gen).unique() for _ in range(n)]
        weights = [torch.rand(len(i), generator=gen) for i in indices]
        cubes: dict[tuple[str, int], float] = {}
        for i, w in zip(indices, weights):
            for doc, start, _, weight in _cite_by_loop(memory, i, w, max_spans=10**6, min_share=0):
                cubes[sentence(doc, start)] = cubes.get(sentence(doc, start), 0.0) + weight**3
        mean = {k: (v / n) ** (1 / 3) for k, v in cubes.items()}
        got = cite_answer(memory, indices, weights, max_spans=4)
        best = sorted(mean.values(), reverse=True)
        assert [c.weight for c in got] == pytest.approx([w for w in best[:4] if w >= 0.1 * best[0]], abs=1e-5), trial
        assert all(mean[sentence(c.doc, c.start)] == pytest.approx(c.weight, abs=1e-5) for c in got), trial


def test_an_answer_cites_the_sentence_its_tokens_read_strongly_before_one_every_token_reads_a_little(tiny_mind):
    """A passage's opening draws every token's attention a little (as the start of a sequence does); the sentence
    a few tokens copy from draws theirs strongly. The mean over 12 tokens ranks the opening first (0.3 against
    0.25); the cubic mean ranks the source first, and a one-token answer cites as that token does."""
    memory = tiny_mind.memorize([DOC])
    opening, source = torch.tensor([0, 1]), torch.tensor([len(tiny_mind.tokenizer(DOC)["input_ids"]) - 3])
    assert cite(memory, opening, torch.ones(2))[0].text != cite(memory, source, torch.ones(1))[0].text
    indices = [torch.cat([opening, source])] * 5 + [opening] * 7
    weights = [torch.tensor([0.15, 0.15, 0.6])] * 5 + [torch.tensor([0.15, 0.15])] * 7
    mean = cite(memory, torch.cat(indices), torch.cat(weights) / 12)
    assert mean[0].text == cite(memory, opening, torch.ones(2))[0].text
    answer = cite_answer(memory, indices, weights)
    assert answer[0].text == cite(memory, source, torch.ones(1))[0].text
    assert [c.weight for c in answer] == pytest.approx([(5 * 0.6**3 / 12) ** (1 / 3), 0.3], abs=1e-5)
    one = cite_answer(memory, indices[:1], weights[:1])
    assert [(c.text, c.weight) for c in one] == [(c.text, c.weight) for c in cite(memory, indices[0], weights[0])]


def test_generation_raises_no_deprecation_warning_from_our_calls(tiny_mind):
    """Our calls into transformers use its current argument names (no FutureWarning in users' output)."""
    memory = tiny_mind.memorize(DOC)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tiny_mind.generate("What is the pass key?", memory=memory, max_new_tokens=3)
        tiny_mind.generate_batch(["a", "b"], [memory, None], max_new_tokens=2)
        tiny_mind.logits(torch.tensor([[1, 2, 3]]), memory=memory)
        tiny_mind.memorize("Some more text to memorize, long enough for two chunks. " * 4)


def test_an_empty_answer_says_why(tiny_mind):
    """An answer whose first token ends it is not silent: a warning names the cause, and with a memory that read
    nothing, says so too."""
    eos = tiny_mind.tokenizer.eos_token_id
    tiny_mind.tokenizer.chat_template = None
    empty = tiny_mind.generate("Question?", max_new_tokens=4, logit_bias={eos: 100.0})
    assert empty.text == "" and empty.finish_reason == "stop"
    assert len(empty.warnings) == 1 and "ended its answer at once" in empty.warnings[0]
    memory = tiny_mind.memorize([DOC] * 4)
    unread = tiny_mind.generate("Question?", memory=memory, max_new_tokens=4, logit_bias={eos: 100.0}, blocks=1,
                                block_size=8, block_relevance=1e9)  # fmt: skip
    assert unread.blocks_read == 0 and "no memory block was relevant" in unread.warnings[0]
    assert unread.to_dict()["warnings"] == unread.warnings
    spoken = tiny_mind.generate("Question?", max_new_tokens=4)
    assert spoken.warnings == []


@pytest.mark.parametrize("retrieval", ["tokens", "blocks"])
def test_a_bfloat16_model_reads_its_memory(retrieval):
    """bfloat16 is the default on a GPU: block selection scores float32 queries against the stored bfloat16 keys
    (shortlisted in bfloat16, then scored exactly), and the answer cites the memory."""
    mind = ExtendedMind(tiny_model("qwen3").to(torch.bfloat16), byte_tokenizer(), "tiny-qwen3-bf16")
    memory = mind.memorize("The keeper of the lighthouse is Ada. " * 4, progress=False)
    options = (
        dict(retrieval="tokens", topk=4)
        if retrieval == "tokens"
        else dict(blocks=2, block_size=16, block_relevance=0.0)
    )
    result = mind.generate("Who keeps the light?", memory=memory, max_new_tokens=6, chat=False, block_gate=0.0,
                           **options)  # fmt: skip
    assert len(result.tokens) == 6
    assert result.citations and {c.doc for c in result.citations} == {memory.documents[0].id}
