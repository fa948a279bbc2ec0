"""Memories as data: adding, removing and replacing documents without touching the others; storage precisions."""

from __future__ import annotations

import pytest
import torch

from extended_mind import DocumentError, ExtendedMindError, Memory

DOCS = {
    "alpha": "Alpha facts: the gate opens at nine. " * 3,
    "beta": "Beta notes, with a number 4821 inside. " * 2,
    "gamma": "Gamma: a third text about otters and rivers.",
}


def flat(memory: Memory) -> dict[str, torch.Tensor]:
    out = {"positions": memory.positions, "token_doc": memory.token_doc, "spans": memory.token_spans}
    for layer in range(memory.num_layers):
        out[f"k{layer}"], out[f"v{layer}"] = memory.keys[layer], memory.values[layer]
    return out


def assert_same_memory(a: Memory, b: Memory) -> None:
    assert [(d.id, d.text, d.name) for d in a.documents] == [(d.id, d.text, d.name) for d in b.documents]
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name


def test_adding_one_at_a_time_equals_adding_together(tiny_mind, tmp_path):
    together = tiny_mind.memorize(list(DOCS.values()), ids=list(DOCS))
    one_by_one = tiny_mind.memorize(DOCS["alpha"], ids=["alpha"])
    tiny_mind.add(one_by_one, DOCS["beta"], ids=["beta"]).save(tmp_path / "m")
    reopened = tiny_mind.load_memory(tmp_path / "m")
    tiny_mind.add(reopened, DOCS["gamma"], ids=["gamma"])
    for memory in (tiny_mind.add(one_by_one, DOCS["gamma"], ids=["gamma"]), reopened):
        assert_same_memory(together, memory)
        a = tiny_mind.generate("Question", memory=together, max_new_tokens=5)
        b = tiny_mind.generate("Question", memory=memory, max_new_tokens=5)
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens] and a.citations == b.citations


def test_remove_drops_every_token_of_the_document_and_keeps_the_rest(tiny_mind, tmp_path):
    memory = tiny_mind.memorize(list(DOCS.values()), ids=list(DOCS))
    expected = tiny_mind.memorize([DOCS["alpha"], DOCS["gamma"]], ids=["alpha", "gamma"])
    memory.remove("beta")
    assert_same_memory(expected, memory)
    # every token still maps to a span of its own document's text
    for i in range(memory.num_tokens):
        doc = memory.documents[int(memory.token_doc[i])]
        s, e = memory.token_spans[i].tolist()
        assert doc.id != "beta" and 0 <= s < e <= len(doc.text)
    result = tiny_mind.generate("Question", memory=memory, max_new_tokens=6)
    for c in result.citations:
        assert c.doc in ("alpha", "gamma") and c.text in DOCS[c.doc]
    memory.save(tmp_path / "m")
    assert_same_memory(expected, Memory.load(tmp_path / "m"))


def test_replace_changes_only_that_document(tiny_mind):
    memory = tiny_mind.memorize(list(DOCS.values()), ids=list(DOCS))
    others = {s.document.id: s.tensors for s in memory.segments if s.document.id != "beta"}
    tiny_mind.replace(memory, "beta", "Beta notes, corrected: the number is 7777.")
    assert [d.id for d in memory.documents] == list(DOCS)  # same place
    assert memory.documents[1].text == "Beta notes, corrected: the number is 7777."
    for s in memory.segments:
        if s.document.id != "beta":
            assert s.tensors is others[s.document.id]  # untouched, not recomputed
    expected = tiny_mind.memorize(
        [DOCS["alpha"], "Beta notes, corrected: the number is 7777.", DOCS["gamma"]], ids=list(DOCS)
    )
    assert_same_memory(expected, memory)


def test_incremental_save_writes_only_new_documents(tiny_mind, tmp_path):
    memory = tiny_mind.memorize([DOCS["alpha"], DOCS["beta"]], ids=["alpha", "beta"])
    path = memory.save(tmp_path / "m")
    files = {p.name: p.stat().st_mtime_ns for p in (path / "tensors").iterdir()}
    tiny_mind.add(memory, DOCS["gamma"], ids=["gamma"]).save()  # saves back where it was saved
    after = {p.name: p.stat().st_mtime_ns for p in (path / "tensors").iterdir()}
    assert len(after) == len(files) + 1
    assert all(after[name] == mtime for name, mtime in files.items())  # old files untouched
    memory.remove("alpha").save()
    assert len(list((path / "tensors").iterdir())) == len(files)  # alpha's file is deleted
    assert [d.id for d in Memory.load(path).documents] == ["beta", "gamma"]


def test_editing_errors_name_the_problem(tiny_mind, tmp_path):
    memory = tiny_mind.memorize(DOCS["alpha"], ids=["alpha"])
    with pytest.raises(DocumentError, match="'alpha'.*already in the memory"):
        tiny_mind.add(memory, "more", ids=["alpha"])
    with pytest.raises(DocumentError, match="'alpha'.*already in the memory"):
        memory.add(tiny_mind.memorize("more", ids=["alpha"]))
    with pytest.raises(DocumentError, match="no document 'nope' in the memory.*'alpha'"):
        memory.remove("nope")
    with pytest.raises(DocumentError, match="no document 'nope'"):
        tiny_mind.replace(memory, "nope", "text")
    tiny_mind.add(memory, "unnamed text")  # default ids skip the ones in use
    assert [d.id for d in memory.documents] == ["alpha", "doc0"]
    memory.save(tmp_path / "m")
    with pytest.raises(ExtendedMindError, match=r"does not hold the model.*ExtendedMind.add\(memory, documents\)"):
        Memory.load(tmp_path / "m").add("more")
    with pytest.raises(ExtendedMindError, match="one document"):
        memory.replace("alpha", "text")
    with pytest.raises(ExtendedMindError, match="unknown memory storage 'int4'"):
        tiny_mind.memorize("x", storage="int4")
    with pytest.raises(ExtendedMindError, match="never been saved"):
        memory.astype("int8").save()


def test_a_memory_emptied_by_removals_acts_as_no_memory(tiny_mind, tmp_path):
    memory = tiny_mind.memorize(DOCS["alpha"], ids=["alpha"]).remove("alpha")
    assert memory.num_tokens == 0 and memory.documents == []
    plain = tiny_mind.generate("Question", max_new_tokens=5)
    empty = tiny_mind.generate("Question", memory=memory.save(tmp_path / "m"), max_new_tokens=5)
    assert [t.id for t in plain.tokens] == [t.id for t in empty.tokens] and empty.citations == []


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8"])
def test_compact_storage_is_smaller_and_close(tiny_mind, tmp_path, storage):
    full = tiny_mind.memorize(list(DOCS.values()), ids=list(DOCS))
    compact = tiny_mind.memorize(list(DOCS.values()), ids=list(DOCS), storage=storage)
    assert compact.info()["storage"] == storage
    ratio = compact.nbytes / full.nbytes
    assert ratio == pytest.approx({"bfloat16": 0.5, "float16": 0.5, "int8": 0.25 + 1 / 16}[storage])
    for layer in range(full.num_layers):
        ref = full.keys[layer]
        assert (compact.keys[layer].float() - ref).abs().max() <= 0.01 * ref.abs().max()
    prompt = torch.tensor([list(b"What opens at nine?")])
    # retrieve every memory, so that only the precision differs, not which memories rank in the top k
    a = tiny_mind.logits(prompt, memory=full, topk=full.num_tokens)
    b = tiny_mind.logits(prompt, memory=compact.save(tmp_path / storage), topk=full.num_tokens)
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    # converting after the fact gives the same tensors as memorizing in that precision
    assert_same_memory(compact, full.astype(storage))
