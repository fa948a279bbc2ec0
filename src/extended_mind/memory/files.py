"""Content-addressed tensor files of saved memories: each named by the sha256 of its bytes, written atomically,
checked against the checksum the manifest recorded before it is used."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from extended_mind.base.errors import MemoryFileError
from extended_mind.memory.mapped import MappedFileError, map_safetensors, matches, write_atomic

if TYPE_CHECKING:  # a segment records the file it is saved in
    from extended_mind.memory.segment import Segment


@dataclass(frozen=True)
class StoredFile:
    """A tensor file of a saved memory, with the checksum and size the manifest recorded for it."""

    path: Path
    sha256: str
    size: int

    def _missing(self) -> MemoryFileError:
        return MemoryFileError(
            f"memory file missing: {self.path} (the memory was changed or damaged after it was opened)"
        )

    def read_bytes(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise self._missing() from None
        if len(data) != self.size:
            raise MemoryFileError(f"corrupt memory file {self.path}: {len(data)} bytes, the manifest says {self.size}")
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise MemoryFileError(f"corrupt memory file {self.path}: its checksum does not match the manifest")
        return data

    def read(self) -> dict[str, torch.Tensor]:
        try:
            return load_bytes(self.read_bytes())
        except SafetensorError as exc:
            raise MemoryFileError(f"corrupt memory file {self.path}: {exc}") from None

    def check(self, remembered_ok: bool = True) -> None:
        """Raise MemoryFileError unless the file has the manifest's size and checksum; a check of this very version
        of the file remembered from before counts unless `remembered_ok` is False (mapped.matches)."""
        try:
            size = self.path.stat().st_size
            if size != self.size:
                raise MemoryFileError(f"corrupt memory file {self.path}: {size} bytes, the manifest says {self.size}")
            if not matches(self.path, self.sha256, remembered_ok):
                raise MemoryFileError(f"corrupt memory file {self.path}: its checksum does not match the manifest")
        except FileNotFoundError:
            raise self._missing() from None

    def map(self) -> dict[str, torch.Tensor]:
        """The file's tensors as views of a memory map (memory/mapped.py: read from disk as used), checked first."""
        self.check()
        try:
            return map_safetensors(self.path)
        except FileNotFoundError:
            raise self._missing() from None
        except MappedFileError as exc:
            raise MemoryFileError(f"corrupt memory file {self.path}: {exc}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_bytes(directory: Path, data: bytes) -> StoredFile:
    """Store `data` under its checksum in `directory` (no write when an intact copy is already there)."""
    sha = hashlib.sha256(data).hexdigest()
    target = directory / f"{sha}.safetensors"
    # a file of that name is reused only when it hashes right: saving again repairs a damaged one
    if not (target.is_file() and target.stat().st_size == len(data) and matches(target, sha)):
        write_atomic(target, [data], digest=False)  # named by its checksum already
    return StoredFile(target, sha, len(data))


def store_segment(segment: Segment, directory: Path) -> StoredFile:
    f = segment.file
    if f is not None and f.path.parent.resolve() == directory.resolve() and f.path.is_file():
        try:
            f.check()  # already saved here (a check remembered from before counts)
            return f
        except MemoryFileError:
            if not segment.is_open:
                raise  # damaged, and not in memory to write again
    if f is not None and not segment.is_open:
        data = f.read_bytes()  # saved elsewhere and not loaded: copy the verified bytes
    else:
        data = save_bytes(segment.tensors, metadata={"format": "extended-mind-segment"})
    return put_bytes(directory, data)
