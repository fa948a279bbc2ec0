"""Correctness oracles on tiny random models of every supported family.

- top-k 0, zero blocks (or no memory) is the unmodified model: same logits, same greedy tokens;
- token retrieval of every memory, with memories at their document positions and the prompt right after them,
  equals attention over the full context (document + prompt) in one pass in which the prompt's first token, the
  attention sink, reads only itself;
- block memory reading every block equals the full context (sink, document, prompt), chunked scoring included;
- in chat form, a memory that fits the slots, every block read (no gate), equals the document pasted at the start
  of the user's message (greedy tokens and their log-probabilities); a memory read nothing is the plain model;
- chunked memorization (context rebuilt from stored keys) equals recomputing each window from scratch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from extended_mind import ExtendedMind
from extended_mind.base.documents import Document
from extended_mind.base.errors import ExtendedMindError
from extended_mind.base.prompting import encode, paragraph_break
from extended_mind.engine.layouts import LABEL_TOKENS, SURE_TOKENS
from extended_mind.engine.memorize import EncodedDocument, encode_documents, memorize_encoded
from tests.conftest import COMMON, WordEmbedder, byte_tokenizer

# Full-context equality is exact in real arithmetic; float32 reassociation (one softmax over memory + local
# instead of one over the concatenation) leaves differences around 1e-6 on these tiny models.
FULL_CONTEXT_ATOL = 1e-4
CPU = torch.device("cpu")


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
    unmodified = [dict(topk=0, retrieval="tokens", position_policy="zero"), dict(topk=0), dict(blocks=0)]
    for mem in (None, memory):
        for options in unmodified:
            assert torch.equal(mind.logits(prompt, memory=mem, **options), expected)
    with torch.inference_mode():
        greedy = reference.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 24:].tolist()
    for options in unmodified:
        result = mind.generate(prompt[0].tolist(), memory=memory, max_new_tokens=8, **options)
        assert [t.id for t in result.tokens] == greedy


def check_all_memories_equal_full_context(mind, reference, device: torch.device = CPU) -> None:
    """Token retrieval of every memory at its document position equals the full context (the oracle; also run with
    the model on a GPU by tests/attention/test_cuda.py)."""
    torch.manual_seed(2)
    doc = torch.randint(0, 256, (48,))
    prompt = torch.randint(0, 256, (1, 20))
    memory = memorize_ids(mind, [doc], window=64)  # one window: memories keep positions 0..47
    assert memory.positions.tolist() == list(range(48))
    full = torch.cat([doc[None], prompt], dim=1).to(device)
    mask = torch.ones(68, 68, dtype=torch.bool).tril()
    mask[48, :48] = False  # the prompt's first token is the sink: it reads no memory
    additive = torch.zeros(68, 68).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager (Gemma 2) takes this
    with torch.inference_mode():
        expected = reference(full, attention_mask=additive[None, None].to(device)).logits[:, 48:]
    options = dict(retrieval="tokens", position_policy="stored")
    got = mind.logits(prompt, memory=memory, topk=48, **options)
    assert got.device.type == device.type
    assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL
    # and fewer memories really do change the result (the oracle is not vacuous)
    fewer = mind.logits(prompt, memory=memory, topk=2, **options)
    assert (fewer - expected).abs().max().item() > 1e-3


def test_all_memories_at_document_positions_equal_full_context(tiny_pair):
    check_all_memories_equal_full_context(*tiny_pair)


def check_every_block_equals_full_context(mind, reference, device: torch.device = CPU) -> None:
    """Block memory reading every block equals the full context (sink, document, prompt), chunked scoring too."""
    torch.manual_seed(4)
    sink = torch.tensor([256])  # <s>: memorized documents and the prompt both start with it
    doc = torch.randint(0, 256, (48,))
    prompt = torch.cat([sink, torch.randint(0, 256, (20,))])[None]
    memory = memorize_ids(mind, [torch.cat([sink, doc])], window=64, sink=True)  # doc tokens at positions 1..48
    with torch.inference_mode():
        full = reference(torch.cat([sink, doc, prompt[0, 1:]])[None].to(device)).logits
    expected = torch.cat([full[:, :1], full[:, 49:]], dim=1)  # the sink's row, then the prompt's rows
    for chunk in (64, 6):  # one chunk, and chunks that each choose (all) blocks anew
        got = mind.logits(prompt, memory=memory, topk=48, blocks=3, block_size=16, block_gate=0.0, chunk=chunk)
        assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL
    fewer = mind.logits(prompt, memory=memory, topk=48, blocks=2, block_size=16, block_gate=0.0)
    assert (fewer - expected).abs().max().item() > 1e-3


def test_block_memory_reading_every_block_equals_full_context(tiny_pair):
    check_every_block_equals_full_context(*tiny_pair)


# A chat template whose head is the sink alone: memories are computed with the sink as their only context, so the
# pasted reference sees the same context exactly when the template puts nothing else before the user's message.
SINK_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}\n{% endif %}"
)


def _greedy_with_logprobs(reference, ids: list[int], steps: int, ban: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the unmodified model, never `ban`, and their log-probabilities."""
    tokens, logprobs = [], []
    with torch.inference_mode():
        for _ in range(steps):
            logp = torch.log_softmax(reference(torch.tensor([ids + tokens])).logits[0, -1].float(), -1)
            token = int(logp.index_fill(0, torch.tensor([ban]), float("-inf")).argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
    return tokens, logprobs


# a template with a system prompt before the user's message: documents are memorized after it (engine/memorize.py)
SYSTEM_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>You answer from the text.\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}\n{% endif %}"
)


@pytest.mark.parametrize("template", [SINK_CHAT_TEMPLATE, SYSTEM_CHAT_TEMPLATE], ids=["sink-head", "system-head"])
def test_chat_form_every_block_of_a_small_memory_equals_pasted_document(tiny_pair, template):
    mind, reference = tiny_pair
    mind.tokenizer.chat_template = template
    document, question = "The keeper of the lighthouse is Ada. ", "Who keeps the light?"
    memory = mind.memorize(document, progress=False)
    no_eos = {mind.tokenizer.eos_token_id: -100.0}
    mind.embedder = WordEmbedder()
    pasted_answers, n = {}, SURE_TOKENS  # answers long enough for the layout trial
    # block_break: the slots glued to the question, or a blank line between them, as pasted text has
    for layout, between in (("never", ""), ("always", "\n\n")):
        text = mind.tokenizer.apply_chat_template([{"role": "user", "content": document + between + question}],
                                                  tokenize=False, add_generation_prompt=True)  # fmt: skip
        pasted = mind.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected, expected_logprobs = _greedy_with_logprobs(reference, pasted, n, mind.tokenizer.eos_token_id)
        pasted_answers[layout] = (expected, expected_logprobs)
        for choice in ("heads", "embedding"):  # whoever chooses, reading every block is pasting the document
            result = mind.generate(question, memory=memory, chat=True, max_new_tokens=n, block_size=16, block_gate=0.0,
                                   logit_bias=no_eos, block_choice=choice, block_break=layout)  # fmt: skip
            assert result.blocks_read == -(-memory.num_tokens // 16)  # every block: the memory fits the slots
            assert [p.text.strip() for p in result.passages] == [document.strip()]  # consecutive blocks: one passage
            assert [t.id for t in result.tokens] == expected
            got_logprobs = [t.logprob for t in result.tokens]
            assert max(abs(a - b) for a, b in zip(got_logprobs, expected_logprobs)) < FULL_CONTEXT_ATOL
    # block_break="surer" keeps the layout whose greedy answer has the higher mean log-probability
    sureness = {k: sum(lp) / len(lp) for k, (_, lp) in pasted_answers.items()}
    surer = max(sureness, key=sureness.get)
    result = mind.generate(question, memory=memory, chat=True, max_new_tokens=n, block_size=16, logit_bias=no_eos,
                           block_gate=0.0, block_break="surer")  # fmt: skip
    got, got_logprobs = [t.id for t in result.tokens], [t.logprob for t in result.tokens]
    assert got in [a for a, _ in pasted_answers.values()]
    if abs(sureness["never"] - sureness["always"]) > 1e-3:  # (closer, the two sides' rounding may choose)
        assert got == pasted_answers[surer][0]
        assert max(abs(a - b) for a, b in zip(got_logprobs, pasted_answers[surer][1])) < FULL_CONTEXT_ATOL
    # a batch row settles its layout as a single answer does (the other row reads no memory)
    batch = mind.generate_batch([question, "Who bakes?"], [memory, None], max_new_tokens=n, block_size=16,
                                logit_bias=no_eos, block_gate=0.0, block_break="surer")  # fmt: skip
    assert [t.id for t in batch[0].tokens] == got
    assert max(abs(a.logprob - b) for a, b in zip(batch[0].tokens, got_logprobs)) < FULL_CONTEXT_ATOL
    # an answer shorter than the trial keeps the slots glued (one token chose worse: many-shot ICL's labels)
    short = mind.generate(question, memory=memory, chat=True, max_new_tokens=3, block_size=16, logit_bias=no_eos,
                          block_gate=0.0, block_break="surer")  # fmt: skip
    assert [t.id for t in short.tokens] == pasted_answers["never"][0][:3]
    expected_logprobs = pasted_answers["never"][1]
    # the oracle is not vacuous: the memory changes the answer's log-probabilities
    plain = mind.generate(question, chat=True, max_new_tokens=n, logit_bias=no_eos)
    assert max(abs(a.logprob - b) for a, b in zip(plain.tokens, expected_logprobs)) > 1e-3


def test_surer_layout_keeps_the_surest_of_three(tiny_pair):
    """A memory that fits the window, one block of several chosen: block_break="surer" tries the block glued to the
    question, after a blank line, and the memory read whole, and answers with the one whose first SURE_TOKENS greedy
    tokens it is surest of (each checked against the option that forces it); a batch row settles the same."""
    mind, _ = tiny_pair
    mind.tokenizer.chat_template = SINK_CHAT_TEMPLATE
    document = "The keeper of the lighthouse is Ada. The baker is Tom, up at dawn. The ferry leaves at noon. "
    memory = mind.memorize(document, progress=False)
    question = "Who is the keeper?"
    options = dict(chat=True, max_new_tokens=SURE_TOKENS, block_size=16, blocks=1, block_relevance=0.0, block_words=0,
                   logit_bias={mind.tokenizer.eos_token_id: -100.0})  # fmt: skip
    forced = {"glued": dict(block_break="never"), "blank": dict(block_break="always"), "whole": dict(whole="fits")}
    answers = {name: mind.generate(question, memory=memory, **options, **extra) for name, extra in forced.items()}
    options["block_break"] = "surer"
    assert answers["glued"].blocks_read == answers["blank"].blocks_read == 1
    assert answers["whole"].blocks_read == -(-memory.num_tokens // 16) > 1
    means = {name: sum(t.logprob for t in a.tokens) / len(a.tokens) for name, a in answers.items()}
    got = mind.generate(question, memory=memory, **options)
    assert [t.id for t in got.tokens] in [[t.id for t in a.tokens] for a in answers.values()]
    best, *rest = sorted(means, key=means.get, reverse=True)
    if means[best] - means[rest[0]] > 1e-3:  # (closer, the two sides' rounding may choose)
        assert [t.id for t in got.tokens] == [t.id for t in answers[best].tokens]
        assert got.blocks_read == answers[best].blocks_read
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got.tokens, answers[best].tokens)) < FULL_CONTEXT_ATOL
    batch = mind.generate_batch([question, "Who bakes?"], [memory, None], **options)
    assert [t.id for t in batch[0].tokens] == [t.id for t in got.tokens]
    assert batch[0].blocks_read == got.blocks_read


@pytest.mark.parametrize("template", [SINK_CHAT_TEMPLATE, SYSTEM_CHAT_TEMPLATE], ids=["sink-head", "system-head"])
def test_a_memory_read_whole_equals_its_text_pasted_before_a_blank_line(tiny_pair, template):
    """whole="fits": a memory that fits the window is read whole, whatever the relevance test would say, with a
    blank line before the question: the document pasted at the start of the user's message, as the harness and
    users paste it. A memory past the window's room is chosen from as before."""
    mind, reference = tiny_pair
    mind.tokenizer.chat_template = template
    document, question = "The keeper of the lighthouse is Ada; the baker is Tom, up at dawn. ", "Who is the keeper?"
    text = mind.tokenizer.apply_chat_template([{"role": "user", "content": document.strip() + "\n\n" + question}],
                                              tokenize=False, add_generation_prompt=True)  # fmt: skip
    pasted = mind.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = mind.tokenizer.eos_token_id
    expected, expected_logprobs = _greedy_with_logprobs(reference, pasted, 6, eos)
    options = dict(chat=True, max_new_tokens=6, block_size=16, blocks=2, logit_bias={eos: -100.0})
    memory = mind.memorize(document.strip(), progress=False)
    whole = mind.generate(question, memory=memory, whole="fits", block_relevance=1e9, **options)
    assert whole.blocks_read == -(-memory.num_tokens // 16) > 2  # more than `blocks`: all of it
    assert [t.id for t in whole.tokens] == expected
    assert max(abs(t.logprob - b) for t, b in zip(whole.tokens, expected_logprobs)) < FULL_CONTEXT_ATOL
    assert mind.generate(question, memory=memory, whole="never", block_relevance=1e9, **options).blocks_read == 0
    # whole="unread": read whole only when the question draws no block and its words meet in one sentence; single
    # and batched alike
    unread = mind.generate(question, memory=memory, whole="unread", block_relevance=1e9, **options)
    assert unread.blocks_read == whole.blocks_read and [t.id for t in unread.tokens] == expected
    batch = mind.generate_batch([question, "Who bakes?"], [memory, None], whole="unread", block_relevance=1e9,
                                **options)  # fmt: skip
    assert batch[0].blocks_read == whole.blocks_read and [t.id for t in batch[0].tokens] == expected
    general = mind.generate("Who keeps the light?", memory=memory, whole="unread", block_relevance=1e9, **options)
    assert general.blocks_read == 0  # "keeps", "light": words the memory does not hold, so not about it
    drawn = dict(options, block_relevance=0.0, block_words=0)
    chosen = mind.generate(question, memory=memory, **drawn)
    assert 0 < chosen.blocks_read <= 2
    assert [t.id for t in mind.generate(question, memory=memory, whole="unread", **drawn).tokens] == [
        t.id for t in chosen.tokens]
    large = mind.memorize(document * 8, progress=False)  # 530 tokens: past the 512-token window's room
    assert mind.generate(question, memory=large, whole="fits", block_relevance=0.0, **options).blocks_read <= 2


@pytest.mark.parametrize("template", [SINK_CHAT_TEMPLATE, SYSTEM_CHAT_TEMPLATE], ids=["sink-head", "system-head"])
def test_blocks_read_after_the_question_equal_their_text_pasted_there(tiny_pair, template):
    """block_break="question": the chosen blocks' tokens, computed afresh after the question and a blank line, then
    a blank line and the question again: the unmodified model on that prompt (greedy tokens, log-probabilities),
    single and batched, with citations into the memory."""
    mind, reference = tiny_pair
    mind.tokenizer.chat_template = template
    document, question = "The keeper of the lighthouse is Ada; the baker is Tom, up at dawn. ", "Who is the keeper?"
    memory = mind.memorize(document.strip(), progress=False)
    eos = mind.tokenizer.eos_token_id
    prompt = encode(mind.tokenizer, question, chat=True, answer_prefix="", memory_at="question")
    stored = encode_documents(mind.tokenizer, [Document("d", document.strip())])[0]
    blank = paragraph_break(mind.tokenizer)
    pasted = (prompt.ids[: prompt.asks_to] + blank + stored.ids[stored.keep].tolist() + blank
              + prompt.ids[prompt.asks_from :])  # fmt: skip
    expected, expected_logprobs = _greedy_with_logprobs(reference, pasted, 6, eos)
    options = dict(chat=True, max_new_tokens=6, block_size=16, block_gate=0.0, block_break="question",
                   logit_bias={eos: -100.0})  # fmt: skip
    result = mind.generate(question, memory=memory, **options)
    assert result.blocks_read == -(-memory.num_tokens // 16)  # every block: the memory fits the slots
    assert [t.id for t in result.tokens] == expected
    assert max(abs(t.logprob - b) for t, b in zip(result.tokens, expected_logprobs)) < FULL_CONTEXT_ATOL
    assert result.citations and all(c.doc == memory.documents[0].id for c in result.citations)
    batch = mind.generate_batch([question, "Who bakes?"], [memory, None], **options)
    assert [t.id for t in batch[0].tokens] == expected and batch[0].blocks_read == result.blocks_read
    assert max(abs(t.logprob - b) for t, b in zip(batch[0].tokens, expected_logprobs)) < FULL_CONTEXT_ATOL
    # not vacuous: the stored blocks before the question answer otherwise
    glued = mind.generate(question, memory=memory, **dict(options, block_break="never"))
    assert max(abs(a.logprob - b.logprob) for a, b in zip(glued.tokens, result.tokens)) > 1e-3
    with pytest.raises(ExtendedMindError, match="uncertainty_threshold"):  # its plan has no other block counts
        mind.generate(question, memory=memory, uncertainty_threshold=1.0, **options)
    # the default reads this layout, for answers shorter than a layout trial too, single and batched; a one-token
    # label keeps the blocks glued, and an uncertainty retry gets "surer" rather than the error
    default = {k: v for k, v in options.items() if k != "block_break"}
    for answer in (mind.generate(question, memory=memory, **default),
                   mind.generate_batch([question, "Who bakes?"], [memory, None], **default)[0]):  # fmt: skip
        assert [t.id for t in answer.tokens] == expected
        assert max(abs(t.logprob - b) for t, b in zip(answer.tokens, expected_logprobs)) < FULL_CONTEXT_ATOL
    label = mind.generate(question, memory=memory, **dict(default, max_new_tokens=LABEL_TOKENS))
    assert [t.id for t in label.tokens] == [t.id for t in glued.tokens][:LABEL_TOKENS]
    assert abs(label.tokens[0].logprob - glued.tokens[0].logprob) < FULL_CONTEXT_ATOL
    # not vacuous: the label reads the memory otherwise than the question layout does
    assert abs(label.tokens[0].citations[0].weight - result.tokens[0].citations[0].weight) > 1e-3
    assert mind.generate(question, memory=memory, uncertainty_threshold=1.0, **default).tokens


def test_a_sliding_window_shorter_than_the_blocks_reads_them_the_surer_way(monkeypatch):
    """Where a sliding-window layer keeps fewer tokens than the chosen blocks hold, the blocks cannot be read after
    the question: the default answers as "surer" does, without running that layout's pass first."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**COMMON, sliding_window=8)).eval()
    model.config.eos_token_id = None
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-gemma3-window-8")
    mind.tokenizer.chat_template = SINK_CHAT_TEMPLATE
    memory = mind.memorize("The keeper of the lighthouse is Ada; the baker is Tom, up at dawn.", progress=False)
    options = dict(chat=True, max_new_tokens=SURE_TOKENS + 2, block_size=16, block_gate=0.0,
                   logit_bias={mind.tokenizer.eos_token_id: -100.0})  # fmt: skip
    surer = mind.generate("Who is the keeper?", memory=memory, block_break="surer", **options)
    passes = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    default = mind.generate("Who is the keeper?", memory=memory, **options)
    assert default.blocks_read and [t.id for t in default.tokens] == [t.id for t in surer.tokens]
    passes.clear()
    again = mind.generate("Who is the keeper?", memory=memory, block_break="surer", **options)
    assert [t.id for t in again.tokens] == [t.id for t in surer.tokens]
    surer_passes = len(passes)
    passes.clear()
    mind.generate("Who is the keeper?", memory=memory, **options)
    assert len(passes) == surer_passes  # no pass for the layout that could not be read


def test_memory_read_nothing_is_the_plain_model(tiny_pair):
    mind, _ = tiny_pair
    mind.tokenizer.chat_template = SINK_CHAT_TEMPLATE
    memory = mind.memorize(["A long first document about boats and harbours. " * 6, "Another one on bread. " * 6],
                           progress=False)  # fmt: skip
    no_eos = {mind.tokenizer.eos_token_id: -100.0}
    options = dict(chat=True, max_new_tokens=6, block_size=16, blocks=2, logit_bias=no_eos)
    plain = mind.generate("What is it?", **options)
    nothing = mind.generate("What is it?", memory=memory, block_relevance=1e9, **options)  # no block is that relevant
    assert nothing.blocks_read == 0 and nothing.citations == [] and nothing.passages == []
    assert [t.id for t in nothing.tokens] == [t.id for t in plain.tokens]
    assert [t.logprob for t in nothing.tokens] == [t.logprob for t in plain.tokens]
    some = mind.generate("What is it?", memory=memory, block_relevance=0.0, **options)
    assert some.blocks_read and some.blocks_read > 0
    texts = {d.id: d.text for d in memory.documents}
    assert 1 <= len(some.passages) <= some.blocks_read  # what was read, as spans of the documents
    for passage in some.passages:
        assert passage.text and texts[passage.doc][passage.start : passage.end] == passage.text


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


@pytest.mark.parametrize("case", ["plain", "padded", "before the slots"])
def test_a_slot_decode_step_is_one_softmax_over_slots_and_local_keys(case):
    """A one-row step reading slots gives the joint softmax over [slots; local keys] written out here (the prompt's
    head reads no slot, padded keys none), and cites each slot token by p * |v| summed over heads."""
    from types import SimpleNamespace

    from extended_mind.attention import function
    from extended_mind.attention.session import Session
    from extended_mind.engine.decoding import record_weights
    from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

    torch.manual_seed(0)
    b, h, g, d, s, skv, scaling = 2, 2, 3, 8, 12, 7, 0.3
    values = torch.randn(h, s, d)
    mem = LayerMemory(keys=torch.randn(h, s, d), values=values, inv_norms=torch.ones(h, s),
                      slot_tokens=torch.randperm(40)[:s], slot_end=20, value_norms=values.norm(dim=-1))  # fmt: skip
    query, key, value = torch.randn(b, h * g, 1, d), torch.randn(b, h, skv, d), torch.randn(b, h, skv, d)
    mask = None
    positions = torch.tensor([[30], [31]])
    if case == "padded":
        mask = torch.ones(b, 1, 1, skv, dtype=torch.bool)
        mask[1, :, :, :3] = False
    if case == "before the slots":
        positions = torch.tensor([[5], [31]])
    session = Session(settings=RetrievalSettings(4), citation_weighting="attention_value")
    session.record_citations = True
    records: list = []
    module = SimpleNamespace(layer_idx=0, sliding_window=None)
    out, _ = function._attend(module, query, key, value, mask, mem, session, records, scaling, 0.0, positions)

    qg = query.view(b, h, g, d)
    slot_logits = torch.einsum("bhgd,hsd->bhgs", qg, mem.keys) * scaling
    slot_logits[(positions[:, 0] < mem.slot_end)] = float("-inf")
    local = torch.einsum("bhgd,bhkd->bhgk", qg, key) * scaling
    if mask is not None:
        local = local.masked_fill(~mask.view(b, 1, 1, skv), float("-inf"))
    p = torch.softmax(torch.cat([slot_logits, local], dim=-1), dim=-1)
    want = torch.einsum("bhgs,hsd->bhgd", p[..., :s], values) + torch.einsum("bhgk,bhkd->bhgd", p[..., s:], value)
    torch.testing.assert_close(out, want.reshape(b, h * g, 1, d).transpose(1, 2), atol=1e-5, rtol=1e-5)
    idx, w = record_weights(records, h * g)
    cited = (p[0, ..., :s] * mem.value_norms.unsqueeze(1)).sum(dim=(0, 1)) / (h * g)
    order = mem.slot_tokens.sort()
    assert torch.equal(idx, order.values)
    torch.testing.assert_close(w, cited[order.indices], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_the_fast_slot_decode_step_equals_the_general_path(padded, monkeypatch):
    """attention/slot_step.py (one decode row reading slots) does the general path's arithmetic in fewer
    operations: the same output and citation record to the bit, padded rows included."""
    from types import SimpleNamespace

    from extended_mind.attention import function
    from extended_mind.attention.session import Session
    from extended_mind.retrieval.layer import LayerMemory, RetrievalSettings

    torch.manual_seed(1)
    b, h, g, d, s, skv = 2, 3, 3, 16, 24, 9
    values = torch.randn(h, s, d)
    mem = LayerMemory(keys=torch.randn(h, s, d), values=values, inv_norms=torch.ones(h, s),
                      slot_tokens=torch.arange(s) * 2, slot_end=40, value_norms=values.norm(dim=-1))  # fmt: skip
    query, key, value = torch.randn(b, h * g, 1, d), torch.randn(b, h, skv, d), torch.randn(b, h, skv, d)
    mask = torch.ones(b, 1, 1, skv, dtype=torch.bool)
    if padded:
        mask[0, :, :, :4] = False
    module = SimpleNamespace(layer_idx=0, sliding_window=None)

    def run() -> tuple[torch.Tensor, list]:
        session = Session(settings=RetrievalSettings(4), record_citations=True)
        session.row_positions = torch.tensor([[50], [60]])
        records: list = []
        out, _ = function._attend(module, query, key, value, mask, mem, session, records, 0.25, 0.0,
                                  session.row_positions)  # fmt: skip
        return out, records

    taken = []
    real = function.attend_slot_step
    monkeypatch.setattr(function, "attend_slot_step", lambda *a: taken.append(1) or real(*a))
    fast, fast_records = run()
    monkeypatch.setattr(function, "plain_slot_step", lambda *a: False)
    general, general_records = run()
    assert taken == [1] and fast.shape == general.shape == (b, 1, h * g, d)
    assert torch.equal(fast, general)
    assert torch.equal(fast_records[0][0], general_records[0][0])
    assert torch.equal(fast_records[0][1], general_records[0][1])


def test_record_weights_sums_shared_slots_as_the_general_sum_does():
    """Records that share one slot index tensor are summed densely; anything else (a single token-retrieval layer
    with repeated indices included) by the general sparse sum: both give sorted unique indices and equal weights."""
    from extended_mind.engine.decoding import record_weights
    from extended_mind.memory.citations import sparse_sum

    torch.manual_seed(0)
    slots = torch.tensor([9, 2, 7, 4])
    shared = [(slots, torch.rand(4)) for _ in range(3)]
    retrieved = [(torch.tensor([[3, 1], [1, 5]]), torch.rand(2, 2))]  # one layer, index 1 read by two heads
    for records in (shared, retrieved):
        idx, w = record_weights(records, 2)
        want_idx, want_w = sparse_sum([r[0] for r in records], [r[1] for r in records])
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(w, want_w / (len(records) * 2))
