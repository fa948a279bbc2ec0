"""Memories: provenance, save/load, merging and the errors around them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from extended_mind import ExtendedMind, Memory, MemoryFileError, MemoryMismatchError
from extended_mind.engine.block_layout import BlockLayout
from extended_mind.memory.mapped import advise_random, map_safetensors
from extended_mind.memory.provenance import documents_of
from tests.conftest import byte_tokenizer, tiny_model


def test_provenance_maps_tokens_to_character_spans(tiny_mind):
    docs = ["Hello there. General facts.", "Second doc, with more text."]
    memory = tiny_mind.memorize(docs, ids=["one", "two"])
    # byte tokenizer: one memory token per byte; sink tokens are not stored
    assert memory.num_tokens == sum(len(d) for d in docs)
    for i in range(memory.num_tokens):
        doc = docs[int(memory.token_doc[i])]
        s, e = memory.token_spans[i].tolist()
        assert 0 <= s < e <= len(doc)
    assert [d.id for d in memory.documents] == ["one", "two"]


def test_spans_read_per_document_equal_the_flat_view(tiny_mind):
    memory = tiny_mind.memorize(["First one. Short.", "Second doc, longer text here.", "Third."], progress=False)
    indices = torch.tensor([memory.num_tokens - 1, 0, 20, 3, 20, 40])  # any order, repeats, every document
    assert torch.equal(documents_of(memory, indices), memory.token_doc[indices].long())
    layout = BlockLayout.of(memory, 4)
    for b in range(layout.num_blocks):  # a block's text, read from its own document's spans
        first, last = int(layout.starts[b]), int(layout.starts[b] + layout.lengths[b] - 1)
        flat = (int(memory.token_doc[first]), int(memory.token_spans[first, 0]), int(memory.token_spans[last, 1]))
        assert layout.span(memory, b) == flat


def test_mapped_tensors_read_at_random_are_unchanged_by_the_hint(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"keys": torch.arange(100_000, dtype=torch.float32).view(1000, 100)}, str(path))
    keys = map_safetensors(path)["keys"]
    advise_random(keys)
    advise_random(keys[:0])
    assert torch.equal(keys[[999, 3]], torch.stack([torch.arange(99_900, 100_000.0), torch.arange(300, 400.0)]))


def test_special_tokens_are_not_memorized(tiny_mind):
    memory = tiny_mind.memorize("abc</s>def")
    assert memory.num_tokens == 6  # the sink <s> and the </s> in the text are dropped


def test_documents_are_memorized_after_the_chat_head(tiny_mind, tmp_path, monkeypatch):
    """With a chat template, a document is memorized after the template's head (its words never stored, spans still
    the document's); each document records that, a save keeps it, and a manifest without it (older memories) reads
    as the sink alone. The keys differ from a memory after the sink alone, and so does the content key."""
    text = "Some facts worth keeping."
    plain = tiny_mind.memorize(text)
    tiny_mind.tokenizer.chat_template = "{% for m in messages %}<s>Be brief.\n{{ m['content'] }}</s>{% endfor %}"
    headed = tiny_mind.memorize(text)
    assert headed.num_tokens == plain.num_tokens == len(text)
    assert [s.context for s in headed.segments] == ["chat"] and [s.context for s in plain.segments] == ["sink"]
    assert torch.equal(headed.token_spans, plain.token_spans)
    assert not torch.equal(headed.keys[1], plain.keys[1]) and headed.content_key() != plain.content_key()
    path = headed.save(tmp_path / "m")
    assert Memory.load(path).segments[0].context == "chat"
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["documents"][0]["context"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert Memory.load(path).segments[0].context == "sink"
    monkeypatch.setenv("EXTENDED_MIND_MEMORIZE_CONTEXT", "sink")
    assert torch.equal(tiny_mind.memorize(text).keys[1], plain.keys[1])


def test_save_then_load_gives_identical_generations(tiny_mind, tmp_path):
    memory = tiny_mind.memorize("Some facts worth keeping. " * 4)
    before = tiny_mind.generate("Question", memory=memory, max_new_tokens=6)
    memory.save(tmp_path / "m")
    loaded = tiny_mind.load_memory(tmp_path / "m")
    after = tiny_mind.generate("Question", memory=loaded, max_new_tokens=6)
    assert [t.id for t in before.tokens] == [t.id for t in after.tokens]
    assert before.citations == after.citations
    for a, b in zip(memory.keys, loaded.keys):
        assert torch.equal(a, b)


def test_save_replaces_an_existing_memory_whole(tiny_mind, tmp_path):
    tiny_mind.memorize("first version").save(tmp_path / "m")
    tiny_mind.memorize("the second version of it").save(tmp_path / "m")
    loaded = Memory.load(tmp_path / "m")
    assert [d.text for d in loaded.documents] == ["the second version of it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # one tensor file for the document, one for the rotary tables; the first version's file is gone
    assert len(list((tmp_path / "m" / "tensors").iterdir())) == 2


def test_merged_memories_cite_the_right_document(tiny_mind):
    a = tiny_mind.memorize("alpha text here", ids=["a"])
    b = tiny_mind.memorize("beta words there", ids=["b"])
    merged = Memory.merge([a, b])
    assert merged.num_tokens == a.num_tokens + b.num_tokens
    assert [merged.documents[i].id for i in merged.token_doc[-3:].tolist()] == ["b"] * 3
    with pytest.raises(MemoryMismatchError, match="duplicate document ids"):
        Memory.merge([a, a])


def test_memory_of_another_model_is_refused(tiny_mind, tmp_path):
    other = ExtendedMind(tiny_model("llama", seed=7), byte_tokenizer(), "other-llama")
    memory = other.memorize("built by another model")
    with pytest.raises(MemoryMismatchError, match="different model.*other weights"):
        tiny_mind.generate("q", memory=memory)
    memory.save(tmp_path / "m")
    with pytest.raises(MemoryMismatchError, match="different model"):
        tiny_mind.load_memory(tmp_path / "m")
    qwen = ExtendedMind(tiny_model("qwen2"), byte_tokenizer(), "tiny-qwen2")
    with pytest.raises(MemoryMismatchError, match="different model.*another architecture"):
        qwen.load_memory(tmp_path / "m")
    with pytest.raises(MemoryMismatchError, match="cannot combine"):
        Memory.merge([memory, tiny_mind.memorize("mine")])


def test_memory_of_another_tokenizer_is_refused(tiny_mind, tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other = ExtendedMind(tiny_mind.model, tokenizer, "same weights, other tokenizer")
    other.memorize("text cut by another tokenizer").save(tmp_path / "m")
    with pytest.raises(MemoryMismatchError, match="different tokenizer"):
        tiny_mind.load_memory(tmp_path / "m")


def test_corrupt_memory_files_give_clear_errors(tiny_mind, tmp_path):
    path = tiny_mind.memorize("some text to save", ids=["notes"]).save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    segment = path / manifest["documents"][0]["file"]
    data = segment.read_bytes()
    segment.write_bytes(data[:100])
    with pytest.raises(MemoryFileError, match="document 'notes' is truncated"):
        Memory.load(path)
    # same size, one byte flipped: opening is lazy, so the damage is found when the tensors are first read
    segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    lazy = tiny_mind.load_memory(path)
    with pytest.raises(MemoryFileError, match="checksum"):
        tiny_mind.generate("Q", memory=lazy, max_new_tokens=2)
    with pytest.raises(MemoryFileError, match="checksum"):
        Memory.load(path).verify()
    segment.unlink()
    with pytest.raises(MemoryFileError, match="document 'notes' is missing"):
        Memory.load(path)
    with pytest.raises(MemoryFileError, match="not a saved memory"):
        Memory.load(tmp_path)
    path = tiny_mind.memorize("some text to save").save(tmp_path / "n")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="format version 99.*newer"):
        Memory.load(path)
    with pytest.raises(MemoryFileError, match="format version 99"):  # never overwritten by an older writer
        tiny_mind.memorize("overwrite").save(path)
    manifest["version"] = "2"  # a string: the message must not read "version 2; this reads version 2"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="format version '2'; this extended-mind reads versions 2, 3"):
        Memory.load(path)
    manifest["version"] = 2
    manifest["documents"][0]["text"] = "edited by hand"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="text of document 'doc0' fails its checksum"):
        Memory.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(MemoryFileError, match="corrupt memory manifest"):
        Memory.load(path)
    del manifest["kv_shapes"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="incomplete memory manifest.*kv_shapes"):
        Memory.load(path)


def test_saving_into_a_foreign_directory_is_refused(tiny_mind, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(MemoryFileError, match="exists and is not a saved memory"):
        tiny_mind.memorize("text").save(tmp_path / "photos")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.jpg"]


def test_a_saved_memory_can_be_passed_by_path(tiny_mind, tmp_path):
    memory = tiny_mind.memorize("Facts on disk. " * 3)
    memory.save(tmp_path / "m")
    by_object = tiny_mind.generate("Q", memory=memory, max_new_tokens=4)
    by_path = tiny_mind.generate("Q", memory=str(tmp_path / "m"), max_new_tokens=4)
    assert [t.id for t in by_object.tokens] == [t.id for t in by_path.tokens]
