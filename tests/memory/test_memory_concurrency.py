"""Fault injection on saved memories: concurrent edits (two processes, two copies), saving again over a damaged
file, and a file changed while it is being hashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from extended_mind import Memory
from extended_mind.base.errors import MemoryConflictError
from extended_mind.memory import mapped as mapped_module

# Each child adds one document under the edit lock, pausing between load and save so that both are inside the
# load-edit-save at once unless the lock makes them wait for each other.
ADDER = textwrap.dedent(
    """
    import sys, time, torch
    from extended_mind import Memory
    from extended_mind.base.documents import Document
    from extended_mind.memory.segment import Segment
    from extended_mind.memory.store import edit_lock

    path, doc_id, go = sys.argv[1], sys.argv[2], sys.argv[3]
    while not __import__("os").path.exists(go):
        time.sleep(0.01)
    with edit_lock(path):
        memory = Memory.load(path)
        time.sleep(0.5)
        h, dk, dv = memory.rope.kv_shapes[0]
        n = 5
        memory.segments = memory.segments + [Segment.build(
            Document(doc_id, "y" * n), [torch.randn(h, n, dk) for _ in range(memory.num_layers)],
            [torch.randn(h, n, dv) for _ in range(memory.num_layers)], torch.zeros(n), torch.zeros(n, 2),
            memory.stride, memory.window, memory.storage,
        )]
        memory.changed()
        memory.save()
    """
)


def test_two_processes_adding_at_once_keep_both_documents(tiny_mind, tmp_path):
    path = tiny_mind.memorize("the first document", ids=["a"]).save(tmp_path / "m")
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    children = [subprocess.Popen([sys.executable, "-c", ADDER, str(path), doc, str(go)], env=env,
                                 stderr=subprocess.PIPE) for doc in ("b", "c")]  # fmt: skip
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
    memory = Memory.load(path)
    assert sorted(d.id for d in memory.documents) == ["a", "b", "c"]
    memory.verify()
    assert len(list((path / "tensors").iterdir())) == 4  # three documents and the rotary tables: no file lost


def test_saving_a_stale_copy_is_refused_not_lost(tiny_mind, tmp_path):
    path = tiny_mind.memorize("the first document", ids=["a"]).save(tmp_path / "m")
    first, second = Memory.load(path), Memory.load(path)
    tiny_mind.add(first, ["a note on boats"], ids=["b"])
    first.save()
    tiny_mind.add(second, ["a note on bread"], ids=["c"])
    with pytest.raises(MemoryConflictError, match="changed by another writer.*nothing was written"):
        second.save()
    assert [d.id for d in Memory.load(path).documents] == ["a", "b"]  # the first edit is kept, whole
    Memory.load(path).verify()
    third = Memory.load(path)  # loaded again, the edit goes through
    tiny_mind.add(third, ["a note on bread"], ids=["c"])
    third.save()
    third.save()  # its own saves do not conflict with each other
    assert [d.id for d in Memory.load(path).documents] == ["a", "b", "c"]
    # a new memory written over a saved one on purpose is not a conflict
    tiny_mind.memorize("a replacement", ids=["r"]).save(path)
    assert [d.id for d in Memory.load(path).documents] == ["r"]


def test_saving_again_repairs_a_damaged_file(tiny_mind, tmp_path):
    path = tiny_mind.memorize("some text to save", ids=["notes"]).save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    segment = path / manifest["documents"][0]["file"]
    data = segment.read_bytes()
    Memory.load(path).verify()  # remembered as checked: the damage below must still be found
    segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same name, same size
    tiny_mind.memorize("some text to save", ids=["notes"]).save(path)
    assert segment.read_bytes() == data
    Memory.load(path).verify()


def test_a_file_changed_while_hashed_is_not_recorded_as_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mapped_module, "_RACY_S", -1.0)  # the change below is old by the time the hash ends
    target = tmp_path / "file.bin"
    target.write_bytes(b"original bytes" * 1000)
    sha = mapped_module.file_sha256(target)
    real = mapped_module.file_sha256

    def hash_then_change(path):
        digest = real(path)
        path.write_bytes(b"changed! bytes" * 1000)  # same size, changed while the hash was being computed
        return digest

    monkeypatch.setattr(mapped_module, "file_sha256", hash_then_change)
    assert mapped_module.matches(target, sha)  # the bytes hashed were right...
    monkeypatch.setattr(mapped_module, "file_sha256", real)
    assert not mapped_module.checked_before(target, sha)  # ...but they are not what the file holds now
    assert not mapped_module.matches(target, sha)
