"""Saved memories are memory-mapped, not read into the process, and a file's checksum is verified once per version."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from extended_mind import Memory
from extended_mind.base.errors import MemoryFileError
from extended_mind.memory import mapped


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


def test_a_checked_file_is_not_hashed_again_until_it_changes(saved, monkeypatch):
    _, path = saved
    hashed = []
    real = mapped.file_sha256
    monkeypatch.setattr(mapped, "file_sha256", lambda p: hashed.append(p) or real(p))
    Memory.load(path).segments[0].tensors  # noqa: B018
    assert len(hashed) == 1
    Memory.load(path).segments[0].tensors  # noqa: B018 - just written: a same-size rewrite could look unchanged
    assert len(hashed) == 2
    monkeypatch.setattr(mapped, "_RACY_S", 0.0)  # as if the file were older
    Memory.load(path).segments[0].tensors  # noqa: B018
    Memory.load(path).segments[0].tensors  # noqa: B018
    assert len(hashed) == 3  # remembered after the check
    Memory.load(path).verify()  # verify always hashes (its own reader)
    file = Memory.load(path).segments[0].file.path
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    st = file.stat()
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(MemoryFileError, match="checksum"):
        Memory.load(path).segments[0].tensors  # noqa: B018
    with pytest.raises(MemoryFileError, match="checksum"):
        Memory.load(path).verify()


def test_malformed_tensor_files_are_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    header = b'{"k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'  # 16 bytes of data, none there
    whole = len(header).to_bytes(8, "little") + header
    for data, why in [(b"abc", "shorter"), (b"\xff" * 16, "header length"), (b"\x04" + b"\0" * 7 + b"{{{{", "header"),
                      (whole, "does not fit"), (whole + b"\0" * 8, "does not fit")]:  # fmt: skip
        bad.write_bytes(data)
        with pytest.raises(mapped.MappedFileError, match=why):
            mapped.map_safetensors(bad)
