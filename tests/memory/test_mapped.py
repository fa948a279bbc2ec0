"""Saved memories are memory-mapped, not read into the process, and each tensor's checksum is verified when it is
first used, once per version of its file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from extended_mind import Memory
from extended_mind.base.errors import MemoryFileError
from extended_mind.memory import files, mapped


@pytest.fixture
def saved(tiny_mind, tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path / "cache"))  # checks are remembered here
    memory = tiny_mind.memorize(["some text to save", "another document"], ids=["a", "b"], storage="bfloat16")
    return memory, memory.save(tmp_path / "m")


def test_documents_are_views_of_the_mapped_file(saved):
    memory, path = saved
    loaded = Memory.load(path)
    assert loaded.nbytes == memory.nbytes and all(s._tensors is None for s in loaded.segments)  # from the headers
    for mine, theirs in zip(loaded.segments, memory.segments):
        assert mine.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(mine.tensors[n], theirs.tensors[n]) for n in theirs.tensors)
    if sys.platform.startswith("linux"):  # the file is mapped into this process, not copied
        assert str(loaded.segments[0].file.path) in Path("/proc/self/maps").read_text()


def _hash_counter(monkeypatch) -> list[tuple[str, int]]:
    """Every tensor hashed from now on, as (file name, start byte)."""
    hashed: list[tuple[str, int]] = []
    real = files.range_sha256
    monkeypatch.setattr(files, "range_sha256", lambda p, a, b: hashed.append((p.name, a)) or real(p, a, b))
    return hashed


def test_a_tensor_is_hashed_when_first_used_and_not_again_until_the_file_changes(saved, monkeypatch):
    _, path = saved
    hashed = _hash_counter(monkeypatch)
    tensors = Memory.load(path).segments[0].tensors
    assert isinstance(tensors, files.CheckedTensors) and hashed == []  # mapped, header checked: nothing hashed yet
    tensors["keys.0"]  # noqa: B018
    tensors["keys.0"]  # noqa: B018
    assert len(hashed) == 1  # the tensor used, once
    memory = Memory.load(path)
    memory.segments[0].tensors  # noqa: B018 - mapped
    expected = sum(t.numel() * t.element_size() for s in saved[0].segments for n, t in s.tensors.items()
                   if n not in ("positions", "spans"))  # fmt: skip
    assert memory.nbytes == expected and len(hashed) == 1  # counted from the header: nothing hashed
    Memory.load(path).segments[0].tensors["keys.0"]  # noqa: B018 - just written: a same-size rewrite could look unchanged
    assert len(hashed) == 2
    monkeypatch.setattr(mapped, "_RACY_S", 0.0)  # as if the file were older
    Memory.load(path).segments[0].tensors["keys.0"]  # noqa: B018
    Memory.load(path).segments[0].tensors["keys.0"]  # noqa: B018
    assert len(hashed) == 3  # remembered after the check
    Memory.load(path).segments[0].tensors["values.1"]  # noqa: B018
    assert len(hashed) == 4  # another tensor: hashed when used
    whole = []
    real = mapped.file_sha256
    monkeypatch.setattr(mapped, "file_sha256", lambda p: whole.append(p) or real(p))
    Memory.load(path).verify()  # verify always hashes: every file, and every tensor against its own checksum
    assert len(whole) == 2 and len(hashed) == 4 + sum(len(s.tensors) for s in Memory.load(path).segments)


def test_a_damaged_tensor_fails_when_used_and_a_damaged_header_when_opened(saved, monkeypatch):
    _, path = saved
    file = Memory.load(path).segments[0].file.path
    ranges = mapped.data_ranges(mapped.header_bytes(file))
    damaged = next(n for n, (a, b) in ranges.items() if b == file.stat().st_size)  # the tensor holding the last byte
    intact = next(n for n, (a, b) in ranges.items() if n != damaged and b > a)
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    st = file.stat()
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    tensors = Memory.load(path).segments[0].tensors
    tensors[intact]  # noqa: B018 - not the damaged bytes
    with pytest.raises(MemoryFileError, match=f"tensor {damaged} fails its checksum"):
        tensors[damaged]  # noqa: B018
    with pytest.raises(MemoryFileError, match="checksum"):
        Memory.load(path).verify()
    data[-1] ^= 0xFF
    data[20] = ord("X") if data[20] != ord("X") else ord("Y")  # inside the header's JSON
    file.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="corrupt memory file"):
        Memory.load(path).segments[0].tensors  # noqa: B018


def test_a_format_2_memory_loads_checked_whole_and_saves_as_format_3(saved, tmp_path, monkeypatch):
    memory, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 2
    for d in manifest["documents"]:
        del d["tensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    whole = []
    real = mapped.file_sha256
    monkeypatch.setattr(mapped, "file_sha256", lambda p: whole.append(p) or real(p))
    old = Memory.load(path)
    tensors = old.segments[0].tensors
    assert not isinstance(tensors, files.CheckedTensors) and len(whole) == 1  # checked whole on first use
    assert all(torch.equal(tensors[n], memory.segments[0].tensors[n]) for n in tensors)
    old.save(tmp_path / "again")
    saved_again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert saved_again["version"] == 3
    assert all(set(d["tensors"]) > {"__header__", "keys.0"} for d in saved_again["documents"])
    loaded, built = Memory.load(tmp_path / "again").segments[1].tensors, memory.segments[1].tensors
    assert isinstance(loaded, files.CheckedTensors)
    assert all(torch.equal(loaded[n], built[n]) for n in built)


def test_malformed_tensor_files_are_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    header = b'{"k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'  # 16 bytes of data, none there
    whole = len(header).to_bytes(8, "little") + header
    for data, why in [(b"abc", "shorter"), (b"\xff" * 16, "header length"), (b"\x04" + b"\0" * 7 + b"{{{{", "header"),
                      (whole, "does not fit"), (whole + b"\0" * 8, "does not fit")]:  # fmt: skip
        bad.write_bytes(data)
        with pytest.raises(mapped.MappedFileError, match=why):
            mapped.map_safetensors(bad)


def test_a_question_hashes_the_tensors_it_reads_not_the_whole_memory(tiny_mind, tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path / "cache"))
    docs = ["The cat sat on the mat. " * 6, "Ships sail at dawn. " * 6, "A third document, of medium length here. " * 4]
    path = tiny_mind.memorize(docs, ids=["a", "b", "c"]).save(tmp_path / "m")
    hashed = _hash_counter(monkeypatch)
    memory = Memory.load(path)
    result = tiny_mind.generate("Where do ships sail?", memory=memory, blocks=1, block_size=16, block_relevance=0.0,
                                max_new_tokens=1)  # fmt: skip
    assert result.blocks_read >= 1
    read_docs = {c.doc for c in result.citations}
    names = {}  # (file name, start) -> tensor name
    for s in memory.segments:
        for name, (start, _) in mapped.data_ranges(mapped.header_bytes(s.file.path)).items():
            names[(s.file.path.name, start)] = (s.document.id, name)
    seen = [names[h] for h in hashed]
    total = sum(len(s.tensors) for s in memory.segments)
    assert 0 < len(seen) < total  # not every tensor of the memory
    unread = {s.document.id for s in memory.segments} - read_docs
    assert unread and not [n for doc, n in seen if doc in unread and n.startswith("values.")]  # no values unread


def test_streamed_tensor_checksums_match_the_written_file(tmp_path):
    """`write_safetensors(tensor_sums=...)` hashes each tensor (and the header) as it streams them: the same sums as
    reading the written file back."""
    tensors = {"a": torch.arange(40, dtype=torch.bfloat16).view(4, 10), "b": torch.ones(3, dtype=torch.int8),
               "c": torch.randn(2, 5)}  # fmt: skip
    sums: dict[str, str] = {}
    path = tmp_path / "t.safetensors"
    sha = mapped.write_safetensors(path, tensors, metadata={"format": "test"}, tensor_sums=sums)
    assert sha == mapped.file_sha256(path)
    assert sums == files.tensor_checksums(path.read_bytes())
