"""Real-model tests of memories as data (SmolLM2-135M-Instruct): removing and replacing a document changes what the
model answers and cites; a quantized memory still answers."""

from __future__ import annotations

from importlib.resources import files

import pytest

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TERMITES = "Question: How many termites can one aardwolf eat in a single night?\nAnswer: One aardwolf can eat about"
PASSKEY = "The pass key is 61734. Remember it. 61734 is the pass key. "


def termites(smol, memory):
    return smol.generate(TERMITES, memory=memory, chat=False, max_new_tokens=12, stop=["\n"])


def passkey(smol, memory, **options):
    # completion style, no answer prefix: in chat form, or after "The pass key is", block memory lets SmolLM2 answer
    # "a magical number ..." or read another document's block (README, "Limits"). The key sits in repeated filler,
    # where every question draws its block: read with block_relevance=0, as docs/api.md advises for such memories
    options.setdefault("block_relevance", 0.0)
    return smol.generate("What is the pass key?", memory=memory, chat=False, max_new_tokens=12, **options)


@pytest.fixture(scope="module")
def article() -> str:
    return (files("extended_mind") / "data" / "aardwolf.txt").read_text()  # edited: 80,000 termites a night


def test_smollm2_remove_and_replace_change_answers_and_citations(smol, article, tmp_path):
    haystack = FILLER * 30 + PASSKEY + FILLER * 30
    memory = smol.memorize([article, haystack], ids=["aardwolf", "passkey"])
    before = termites(smol, memory)
    assert "80,000" in before.text and before.citations[0].doc == "aardwolf"

    # replace: the answer follows the new version and cites its edited sentence
    smol.replace(memory, "aardwolf", article.replace("80,000", "30,000"))
    replaced = termites(smol, memory)
    assert "30,000" in replaced.text and "80,000" not in replaced.text, replaced.text
    assert replaced.citations[0].doc == "aardwolf" and "30,000" in replaced.citations[0].text

    # remove: the fact only that document held is gone, and nothing cites it; the other document still answers
    memory.remove("aardwolf").save(tmp_path / "m")
    reloaded = smol.load_memory(tmp_path / "m")
    after = termites(smol, reloaded)
    assert "30,000" not in after.text and "80,000" not in after.text, after.text
    assert all(c.doc == "passkey" for c in after.citations)
    key = passkey(smol, reloaded)
    assert "61734" in key.text and key.citations[0].doc == "passkey" and "61734" in key.citations[0].text


def test_smollm2_int8_memory_still_answers(smol, article):
    memory = smol.memorize(article, storage="int8")
    result = termites(smol, memory)
    assert "80,000" in result.text and "80,000" in result.citations[0].text
