"""Real-model tests with SmolLM2-135M-Instruct: behaviour only a trained model shows (minutes, not seconds)."""

from __future__ import annotations

import random
from importlib.resources import files

import pytest
import torch
from transformers import AutoModelForCausalLM

from extended_mind.base.documents import Document
from extended_mind.base.loading import _converted_default
from extended_mind.cli import main
from extended_mind.engine.memorize import EncodedDocument, memorize_encoded

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Trained weights have larger activations than the tiny models; float32 differences stay around 1e-5 to 1e-4.
FULL_CONTEXT_ATOL = 2e-3


@pytest.fixture(scope="module")
def reference():
    return AutoModelForCausalLM.from_pretrained(_converted_default(), dtype=torch.float32).eval()


def test_smollm2_topk_zero_is_the_unmodified_model(smol, reference):
    prompt = smol.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    memory = smol.memorize("Paris is a city. " * 20)
    with torch.inference_mode():
        expected = reference(prompt).logits
        greedy = reference.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :].tolist()
    for options in (dict(topk=0, retrieval="tokens", position_policy="zero"), dict(topk=0), dict(blocks=0)):
        assert torch.equal(smol.logits(prompt, memory=memory, **options), expected)
        result = smol.generate(prompt[0].tolist(), memory=memory, max_new_tokens=8, **options)
        assert [t.id for t in result.tokens] == greedy[: len(result.tokens)]


def _one_window_memory(smol, ids: torch.Tensor, sink: bool):
    """`ids` memorized in one window (keys as in a full-context pass); with `sink` the first token is not stored."""
    n = len(ids)
    keep = torch.ones(n, dtype=torch.bool)
    keep[0] = not sink
    enc = EncodedDocument(ids, torch.zeros(n, 2, dtype=torch.int32), keep)
    return memorize_encoded(smol.model, [Document("d", "x")], [enc], stride=256, window=1024, identity=smol.identity,
                            progress=False)  # fmt: skip


MUSEUM = "The museum opens at nine and closes at five. " * 12


def test_smollm2_all_memories_equal_full_context(smol, reference):
    """Token retrieval of every memory at its document position equals the full context in which the prompt's
    first token (the sink) reads only itself."""
    doc = smol.tokenizer(MUSEUM, return_tensors="pt")["input_ids"][0]
    prompt = smol.tokenizer(" When does the museum open?", return_tensors="pt")["input_ids"]
    n, m = len(doc), prompt.shape[1]
    memory = _one_window_memory(smol, doc, sink=False)
    mask = torch.zeros(n + m, n + m).masked_fill(~torch.ones(n + m, n + m, dtype=torch.bool).tril(), float("-inf"))
    mask[n, :n] = float("-inf")
    with torch.inference_mode():
        expected = reference(torch.cat([doc[None], prompt], dim=1), attention_mask=mask[None, None]).logits[:, n:]
    got = smol.logits(prompt, memory=memory, topk=n, retrieval="tokens", position_policy="stored")
    assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL


def test_smollm2_block_memory_of_every_block_equals_full_context(smol, reference):
    bos = torch.tensor([smol.tokenizer.bos_token_id])
    doc = smol.tokenizer(MUSEUM, return_tensors="pt")["input_ids"][0]
    question = smol.tokenizer(" When does the museum open?", return_tensors="pt")["input_ids"][0]
    memory = _one_window_memory(smol, torch.cat([bos, doc]), sink=True)
    n = len(doc)
    blocks = next(d for d in range(2, n + 1) if n % d == 0)  # blocks that fill the slots exactly: positions 1..n
    with torch.inference_mode():
        full = reference(torch.cat([bos, doc, question])[None]).logits
    expected = torch.cat([full[:, :1], full[:, 1 + n :]], dim=1)
    options = dict(topk=n, blocks=blocks, block_size=n // blocks, block_gate=0.0)  # every block
    got = smol.logits(torch.cat([bos, question])[None], memory=memory, **options)
    assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL


def test_smollm2_finds_a_passkey_in_a_memory_beyond_its_window(smol):
    rng = random.Random(20261122)
    key = rng.randint(10000, 99999)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    n_filler = 12_600 // 24  # ~24 tokens per filler block
    depth = rng.uniform(0.1, 0.9)
    blocks = [FILLER] * n_filler
    blocks.insert(int(depth * n_filler), needle)
    memory = smol.memorize("".join(blocks))
    assert memory.num_tokens >= 12_000 > smol.context_window
    # In repeated filler the key's block is the only distinct text, so unrelated questions draw it too and the
    # relevance test (calibrated on them) does not single it out: filler-like memories read with
    # block_relevance=0 (docs/evaluation.md). Completion style: in chat form SmolLM2 answers "The pass key is a
    # magical number ..." from block memory.
    result = smol.generate("What is the pass key?", memory=memory, chat=False, max_new_tokens=12, block_relevance=0.0)
    assert str(key) in result.text, (key, depth, result.text)
    top = result.citations[0]
    text = memory.documents[0].text
    start = text.index(needle)
    assert start <= top.start and top.end <= start + len(needle), top  # the passkey sentence is the top citation
    assert str(key) in top.text


def test_smollm2_memory_reads_nothing_for_questions_it_does_not_hold(smol):
    """A memory must not change answers it has nothing for: the relevance test reads no block, and the answer is the
    plain model's, token for token, in chat and completion form; a question about the memory reads it."""
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text(encoding="utf-8")
    memory = smol.memorize(article, progress=False)
    for question, chat in [("What is the capital of France?", True), ("How many days are in a week?", True),
                           ("Question: What is the capital of France?\nAnswer:", False)]:  # fmt: skip
        plain = smol.generate(question, chat=chat, max_new_tokens=10)
        got = smol.generate(question, memory=memory, chat=chat, max_new_tokens=10)
        assert got.blocks_read == 0 and got.citations == [], question
        assert [t.id for t in got.tokens] == [t.id for t in plain.tokens], question
    asked = smol.generate("How many termites can one aardwolf eat in a single night?", memory=memory, max_new_tokens=8)
    assert asked.blocks_read and asked.citations


def test_demo_prints_the_counterfactual_answer_and_its_source(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    answer = out.split("Answer:", 1)[1].split("\n", 1)[0]
    assert "80,000" in answer
    cited = out.split("Cited spans", 1)[1].splitlines()[1]
    assert "80,000 termites" in cited
