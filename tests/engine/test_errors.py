"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extended_mind import (
    DocumentError,
    ExtendedMind,
    ExtendedMindError,
    ModelLoadError,
    PromptTooLongError,
)


def test_empty_document(tiny_mind, tmp_path):
    with pytest.raises(DocumentError, match="empty"):
        tiny_mind.memorize("   \n")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DocumentError, match="empty.*empty.txt"):
        tiny_mind.memorize(tmp_path / "empty.txt")
    with pytest.raises(DocumentError, match="no documents"):
        tiny_mind.memorize([])


def test_binary_file(tiny_mind, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DocumentError, match="binary.*blob.bin"):
        tiny_mind.memorize(tmp_path / "blob.bin")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="not UTF-8"):
        tiny_mind.memorize(str(tmp_path / "latin1.txt"))


def test_missing_path(tiny_mind):
    with pytest.raises(DocumentError, match="not found: .*missing.txt"):
        tiny_mind.memorize(Path("missing.txt"))
    with pytest.raises(DocumentError, match="not found: notes/missing.md"):
        tiny_mind.memorize("notes/missing.md")


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_invalid_topk(tiny_mind, bad):
    with pytest.raises(ExtendedMindError, match="topk must be an integer >= 0"):
        tiny_mind.generate("q", topk=bad)


def test_invalid_options(tiny_mind):
    with pytest.raises(ExtendedMindError, match="unknown ranking 'dot'"):
        tiny_mind.generate("q", ranking="dot")
    with pytest.raises(ExtendedMindError, match="unknown position policy 'far'"):
        tiny_mind.generate("q", position_policy="far")
    with pytest.raises(ExtendedMindError, match="memory_layers \\[5\\] out of range"):
        tiny_mind.generate("q", memory_layers=[5])
    with pytest.raises(ExtendedMindError, match="stride must be"):
        tiny_mind.memorize("text", stride=64, window=32)
    with pytest.raises(ExtendedMindError, match="prompt is empty"):
        tiny_mind.generate("  ")
    with pytest.raises(ExtendedMindError, match="memory must be a Memory"):
        tiny_mind.generate("q", memory=[42])
    with pytest.raises(ExtendedMindError, match="not a saved memory"):
        tiny_mind.generate("q", memory="no-such-memory-dir")


def test_question_longer_than_the_window(tiny_mind):
    with pytest.raises(PromptTooLongError, match="prompt is 600 tokens, longer than the model's window of 512"):
        tiny_mind.generate("x" * 600)
    memory = tiny_mind.memorize("y" * 300, window=256)
    with pytest.raises(PromptTooLongError, match="after the memory's positions"):
        tiny_mind.generate("x" * 300, memory=memory, retrieval="tokens")
    tiny_mind.generate("x" * 300, memory=memory, retrieval="tokens", position_policy="zero", max_new_tokens=2)
    # block memory reads as many blocks as the window leaves room for: 512 - 301 - 2 leaves 3 of 64 tokens (no room
    # to ask the question again after them: the default then reads them before it)
    result = tiny_mind.generate("x" * 300, memory=memory, max_new_tokens=2, blocks=8, block_size=64,
                                block_words=0)  # the question shares no word with the memory: no word test here
    assert result.citations and {c.doc for c in result.citations} == {"doc0"}
    with pytest.raises(PromptTooLongError, match="leave no room for a memory block of 64 tokens"):
        tiny_mind.generate("x" * 300, memory=memory, max_new_tokens=2, block_size=64, block_break="question")
    with pytest.raises(PromptTooLongError, match="leave no room for a memory block of 300 tokens"):
        tiny_mind.generate("x" * 300, memory=memory, max_new_tokens=2, blocks=1, block_size=300)


def test_unknown_model():
    with pytest.raises(ModelLoadError, match="unknown model './no/such/model'"):
        ExtendedMind.from_pretrained("./no/such/model")


def test_logits_checks_its_options_like_generate(tiny_mind):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ExtendedMindError, match="unknown ranking 'dot'"):
        tiny_mind.logits(ids, ranking="dot")
    with pytest.raises(ExtendedMindError, match="memory_layers \\[9\\] out of range"):
        tiny_mind.logits(ids, memory=tiny_mind.memorize("some text"), memory_layers=[9])
