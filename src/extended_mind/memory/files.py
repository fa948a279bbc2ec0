"""Content-addressed tensor files of saved memories: each named by the sha256 of its bytes, written atomically,
checked against the checksums the manifest recorded before it is used: a document's file tensor by tensor as its
tensors are first used (format 3), other files whole."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from extended_mind.base.errors import MemoryFileError
from extended_mind.memory.mapped import (
    MappedFileError,
    checked_before,
    data_ranges,
    file_version,
    header_bytes,
    map_safetensors,
    matches,
    range_sha256,
    remember_tensors_checked,
    tensors_checked_before,
    write_atomic,
)

if TYPE_CHECKING:  # a segment records the file it is saved in
    from extended_mind.memory.segment import Segment


T, R = TypeVar("T"), TypeVar("R")

TENSOR_DIR = "tensors"  # a saved memory's tensor files, under its directory


@dataclass(frozen=True)
class StoredFile:
    """A tensor file of a saved memory, with the checksum and size the manifest recorded for it."""

    path: Path
    sha256: str
    size: int
    # per-tensor checksums ("__header__": the bytes before the first tensor): tensors are then checked as used
    tensor_sha256: Mapping[str, str] | None = field(default=None, compare=False)

    def _missing(self) -> MemoryFileError:
        return MemoryFileError(
            f"memory file missing: {self.path} (the memory was changed or damaged after it was opened)"
        )

    def _check_size(self, size: int) -> None:
        if size != self.size:
            raise MemoryFileError(f"corrupt memory file {self.path}: {size} bytes, the manifest says {self.size}")

    def read_bytes(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise self._missing() from None
        self._check_size(len(data))
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
            self._check_size(self.path.stat().st_size)
            if not matches(self.path, self.sha256, remembered_ok):
                raise MemoryFileError(f"corrupt memory file {self.path}: its checksum does not match the manifest")
        except FileNotFoundError:
            raise self._missing() from None

    def map(self) -> Mapping[str, torch.Tensor]:
        """The file's tensors as views of a memory map (memory/mapped.py: read from disk as used): with per-tensor
        checksums, each tensor is checked when first used (CheckedTensors), else the whole file now."""
        if self.tensor_sha256 is None:
            self.check()
        try:
            if self.tensor_sha256 is None:
                return map_safetensors(self.path)
            self._check_size(self.path.stat().st_size)
            version = file_version(self.path)  # before anything is hashed: a later change is not recorded as checked
            head = header_bytes(self.path)
            if hashlib.sha256(head).hexdigest() != self.tensor_sha256.get("__header__"):
                raise MemoryFileError(f"corrupt memory file {self.path}: its header fails its checksum")
            tensors = map_safetensors(self.path)
            if checked_before(self.path, self.sha256):  # the whole file was hashed before
                checked = set(tensors)
            else:
                checked = tensors_checked_before(self.path, self.sha256)
            return CheckedTensors(self, tensors, data_ranges(head), checked, version)
        except FileNotFoundError:
            raise self._missing() from None
        except MappedFileError as exc:
            raise MemoryFileError(f"corrupt memory file {self.path}: {exc}") from None

    def with_tensor_checksums(self) -> StoredFile:
        """This file with its per-tensor checksums (read and checked whole when the manifest had none)."""
        if self.tensor_sha256 is not None:
            return self
        return replace(self, tensor_sha256=tensor_checksums(self.read_bytes()))


class CheckedTensors(Mapping[str, torch.Tensor]):
    """A saved document's mapped tensors, each hashed against its recorded checksum the first time it is used (or
    checked before for this version of the file, remembered in the cache directory): a question reads and hashes
    only the tensors it uses. Shapes come from the (checked) header without reading any tensor."""

    def __init__(self, file: StoredFile, tensors: dict[str, torch.Tensor], ranges: dict[str, tuple[int, int]],
                 checked: set[str], version: str) -> None:  # fmt: skip
        self.file, self._tensors, self._ranges, self._version = file, tensors, ranges, version
        self._checked = checked & set(tensors)
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        if name not in self._checked:
            self.check([name])
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._tensors.items()}

    @property
    def sizes(self) -> dict[str, int]:
        """Bytes of each tensor, from the header: counting them hashes nothing."""
        return {name: end - start for name, (start, end) in self._ranges.items()}

    def check(self, names: Iterable[str], remembered_ok: bool = True) -> None:
        """Hash tensors `names` (those not checked yet, unless `remembered_ok` is False); MemoryFileError if one
        fails its checksum."""
        path, sums = self.file.path, self.file.tensor_sha256 or {}
        with self._lock:
            wanted = [n for n in dict.fromkeys(names) if n in self._tensors]
            todo = [n for n in wanted if n not in self._checked or not remembered_ok]
            try:
                hashed = parallel_map(lambda name: range_sha256(path, *self._ranges[name]), todo)
            except FileNotFoundError:
                raise self.file._missing() from None
            for name, sha in zip(todo, hashed):
                if sha != sums.get(name):
                    raise MemoryFileError(f"corrupt memory file {path}: tensor {name} fails its checksum")
                self._checked.add(name)
            if todo:
                remember_tensors_checked(path, self.file.sha256, todo, self._version)


def parallel_map(fn: Callable[[T], R], items: list[T], workers: int = 4) -> list[R]:
    """`fn` over `items` on up to `workers` threads (file reads and hashing release the GIL: a million-token
    memory's prepared keys, 5 GB read from a cold disk and hashed, took 10.6 s one tensor at a time)."""
    workers = min(workers, len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def tensor_checksums(data: bytes) -> dict[str, str]:
    """Per-tensor checksums of safetensors bytes `data` ("__header__": the bytes before the first tensor)."""
    try:
        n = int.from_bytes(data[:8], "little")
        head = data[: 8 + n]
        ranges = data_ranges(head)
    except MappedFileError as exc:
        raise MemoryFileError(f"not a tensor file: {exc}") from None
    view = memoryview(data)
    sums = {"__header__": hashlib.sha256(head).hexdigest()}
    sums |= {name: hashlib.sha256(view[start:end]).hexdigest() for name, (start, end) in ranges.items()}
    return sums


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_bytes(directory: Path, data: bytes, per_tensor: bool = False) -> StoredFile:
    """Store `data` under its checksum in `directory` (no write when an intact copy is already there);
    `per_tensor`: with the checksum of each tensor too (a document's file)."""
    sha = hashlib.sha256(data).hexdigest()
    target = directory / f"{sha}.safetensors"
    # a file of that name is reused only when it hashes right: saving again repairs a damaged one
    if not (target.is_file() and target.stat().st_size == len(data) and matches(target, sha)):
        write_atomic(target, [data], digest=False)  # named by its checksum already
    return StoredFile(target, sha, len(data), tensor_checksums(data) if per_tensor else None)


def store_segment(segment: Segment, directory: Path) -> StoredFile:
    f = segment.file
    if f is not None and f.path.parent.resolve() == directory.resolve() and f.path.is_file():
        try:
            f.check()  # already saved here (a check remembered from before counts)
            return f.with_tensor_checksums()
        except MemoryFileError:
            if not segment.is_open:
                raise  # damaged, and not in memory to write again
    if f is not None and not segment.is_open:
        data = f.read_bytes()  # saved elsewhere and not loaded: copy the verified bytes
    else:
        data = save_bytes(dict(segment.tensors), metadata={"format": "extended-mind-segment"})
    return put_bytes(directory, data, per_tensor=True)


def stored_file(path: Path, entry: dict, what: str, per_tensor: bool = False) -> StoredFile:
    """The tensor file a manifest entry names (`per_tensor`: with the checksum of each of its tensors)."""
    name = str(entry["file"])
    file = (path / name).resolve()
    if file.parent != (path / TENSOR_DIR).resolve():
        raise MemoryFileError(f"corrupt memory manifest in {path}: {what} points outside the memory ({name!r})")
    sums = entry["tensors"] if per_tensor else None
    if sums is not None and not (
        isinstance(sums, dict) and "__header__" in sums and all(isinstance(v, str) for v in sums.values())
    ):
        raise MemoryFileError(f"corrupt memory manifest in {path}: the tensor checksums of {what} are malformed")
    stored = StoredFile(file, str(entry["sha256"]), int(entry["bytes"]), sums)
    if not file.is_file():
        raise MemoryFileError(f"corrupt memory at {path}: the tensor file of {what} is missing ({name})")
    size = file.stat().st_size
    if size != stored.size:
        raise MemoryFileError(
            f"corrupt memory at {path}: the tensor file of {what} is truncated or damaged ({name}: {size} bytes, "
            f"expected {stored.size})"
        )
    return stored
