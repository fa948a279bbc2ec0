"""Saved tensor files opened as memory maps, and checksum checks remembered per file version.

A memory of a million tokens is tens of GB on disk; reading it into the process would hold all of it in RAM, while
block memory reads a small part (the selection layers' keys and the chosen blocks). So a saved file's tensors are
views of a private memory map: pages are read from disk when used and can be dropped again by the OS, writes (none
are made) would stay private to the process, and no file descriptor is held.

Checksums: a document's file saved with per-tensor checksums (memory format 3) has its header checked when it is
mapped and each tensor hashed the first time it is used, so a question hashes what it reads (block memory: the
selection layers' keys, the chosen blocks' tensors), not the whole memory. Older files are hashed whole. Hashing is
streamed from the file, not through the map, so it does not count as memory in use. A successful check (of a file
or of its tensors) is remembered in the cache directory for that version of the file (device, inode, size, mtime and
ctime), so a large memory is not hashed again by every process that opens it. Any write to the file changes its
mtime/ctime and the file is hashed again; files changed in the last few seconds are never remembered, since a
same-size rewrite within the filesystem's timestamp granularity would look unchanged.
`Memory.verify()` always hashes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from extended_mind.base.paths import cache_dir

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_RACY_S = 3.0  # files modified more recently than this are hashed again next time


_CHUNK = 8 << 20


class MappedFileError(ValueError):
    """A file is not a well-formed safetensors file (the caller names the memory file in its error)."""


def parse_header(head: bytes, size: int) -> dict:
    """The header of a safetensors file of `size` bytes from its first bytes `head` (at least the length and the
    header), checked to fit the file."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if n <= 0 or 8 + n > size or 8 + n > len(head):
        raise MappedFileError(f"header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(head[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MappedFileError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise MappedFileError("the header is not a table of tensors")
    return header


def header_bytes(path: Path) -> bytes:
    """The length field and the header of safetensors file `path` (the bytes before its first tensor)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > (100 << 20):
            raise MappedFileError(f"header length {n} is not plausible")
        fh.seek(0)
        return fh.read(8 + n)


def data_ranges(head: bytes) -> dict[str, tuple[int, int]]:
    """Byte range [start, end) in the file of every tensor named in header bytes `head` (header_bytes)."""
    header = parse_header(head, 1 << 62)
    base = len(head)
    try:
        return {k: (base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
                for k, v in header.items() if k != "__metadata__"}  # fmt: skip
    except (KeyError, TypeError, ValueError, IndexError):
        raise MappedFileError("a tensor has a malformed header entry") from None


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`, as views of one private read-on-demand memory map of the file."""
    size = path.stat().st_size
    if size < 8:
        raise MappedFileError("shorter than a safetensors header")
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    n = int.from_bytes(raw[:8].numpy().tobytes(), "little")
    if n <= 0 or 8 + n > size:
        raise MappedFileError(f"header length {n} does not fit the file ({size} bytes)")
    header = parse_header(raw[: 8 + n].numpy().tobytes(), size)
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], [int(x) for x in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MappedFileError(f"tensor {name!r} has a malformed header entry") from None
        count = math.prod(shape)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - start != count * itemsize or start < 0 or base + end > size:
            raise MappedFileError(f"tensor {name!r} does not fit its place in the file")
        data = raw[base + start : base + end]
        if (base + start) % itemsize:  # unaligned (not written by safetensors >= 0.3): copy that tensor
            data = data.clone()
        out[name] = data.view(dtype).view(shape) if count else torch.empty(shape, dtype=dtype)
    return out


_MADV_RANDOM = 1  # Linux <sys/mman.h>


def advise_random(tensor: torch.Tensor) -> None:
    """Tell the OS that a mapped tensor is read a few rows at a time, at random: no readahead around each page it
    reads. A cold million-token memory's selection keys are gathered a few hundred rows per layer, and with the
    disk's readahead (8 MB on the machine measured) each row read 0.45 MB from disk: 2 GB and 1.2 s of a first
    question. A hint only: nothing happens off Linux or if the call fails."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    try:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_RANDOM)
    except (OSError, AttributeError):
        pass


def tensor_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor of safetensors file `path`, from its header alone (nothing else is read or checked)."""
    return {k: end - start for k, (start, end) in data_ranges(header_bytes(path)).items()}


def file_version(path: Path) -> str:
    """What identifies this version of `path` (device, inode, size, mtime, ctime: a write changes it)."""
    st = path.stat()
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _stamp(sha256: str) -> Path:
    return cache_dir() / "verified" / sha256


def _stamp_lines(stamp: Path, path: Path) -> list[str] | None:
    """The lines `stamp` records after naming this version of `path`; None when it names no such thing."""
    try:
        lines = stamp.read_text().split("\n")
        return lines[2:] if lines[:2] == [str(path.resolve()), file_version(path)] else None
    except OSError:
        return None


def _record(stamp: Path, path: Path, version: str | None, recent_ok: bool, lines: Iterable[str] = ()) -> None:
    """Write `stamp` naming this version of `path` (then `lines`), unless the file is no longer `version` (its stat
    from before it was hashed) or changed too recently to tell a later change apart (unless `recent_ok`)."""
    try:
        now = file_version(path)
        if version is not None and now != version:
            return  # changed while it was being hashed: what was hashed is not what is there
        if not recent_ok and time.time() - max(path.stat().st_mtime, path.stat().st_ctime) < _RACY_S:
            return
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{stamp.name}")
        tmp.write_text("\n".join([str(path.resolve()), now, *lines]))
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache only costs hashing again
        pass


def checked_before(path: Path, sha256: str) -> bool:
    """Whether this version of `path` was hashed to `sha256` before (by any process using this cache)."""
    return _stamp_lines(_stamp(sha256), path) == []


def file_sha256(path: Path) -> str:
    return range_sha256(path)


def range_sha256(path: Path, start: int = 0, end: int | None = None) -> str:
    """sha256 of bytes [start, end) of `path` (to its end by default), streamed from the file (not through a map)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        left = math.inf if end is None else end - start
        while left > 0 and (chunk := fh.read(int(min(_CHUNK, left)))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _tensor_stamp(sha256: str) -> Path:
    return cache_dir() / "verified" / f"{sha256}.tensors"


def tensors_checked_before(path: Path, sha256: str) -> set[str]:
    """Names of the tensors of this version of `path` (the file whose bytes hash to `sha256`) checked before."""
    return set(_stamp_lines(_tensor_stamp(sha256), path) or ()) - {""}


def remember_tensors_checked(path: Path, sha256: str, names: Iterable[str], version: str) -> None:
    """Record that tensors `names` of `path` hashed right (unless the file is no longer `version`, or changed too
    recently: `_record`). Two processes recording at once may lose one's names: that costs only hashing again."""
    names = tensors_checked_before(path, sha256) | set(names)
    _record(_tensor_stamp(sha256), path, version, recent_ok=False, lines=sorted(names))


def matches(path: Path, sha256: str, remembered_ok: bool = True) -> bool:
    """Whether `path` hashes to `sha256`. A check of this very version of the file remembered from before counts
    (unless `remembered_ok` is False); a passing hash is remembered."""
    if remembered_ok and checked_before(path, sha256):
        return True
    before = file_version(path)  # the version hashed: a change made while hashing must not be recorded as checked
    if file_sha256(path) != sha256:
        return False
    remember_checked(path, sha256, version=before)
    return True


def remember_checked(path: Path, sha256: str, recent_ok: bool = False, version: str | None = None) -> None:
    """Record that `path` hashed to `sha256`, unless it changed too recently to tell a later change apart
    (`recent_ok`: this process just wrote those bytes and hashed them as it wrote), or is no longer `version` (the
    file's stat from before it was hashed)."""
    _record(_stamp(sha256), path, version, recent_ok)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      tensor_sums: dict[str, str] | None = None) -> str:  # fmt: skip
    """Write `tensors` to `path` in the safetensors format, streamed (no second copy in memory, unlike
    safetensors' own writer), atomically (written aside, fsynced, renamed). Returns the file's sha256; with
    `tensor_sums`, fills it with the sha256 of each tensor's bytes and of the header ("__header__", as
    files.tensor_checksums names them), hashed as they are written."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # widest first: every tensor aligned
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    codes = {v: k for k, v in _DTYPES.items()}
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)

    def chunks() -> Iterator[bytes]:
        first = len(head).to_bytes(8, "little") + head
        if tensor_sums is not None:
            tensor_sums["__header__"] = hashlib.sha256(first).hexdigest()
        yield first
        for name in names:
            flat = tensors[name].detach().cpu().contiguous().reshape(-1)
            h = hashlib.sha256()
            for start in range(0, flat.numel(), _CHUNK):  # in pieces: a bool/bfloat16 tensor has no buffer
                piece = flat[start : start + _CHUNK].view(torch.uint8).numpy().tobytes()
                if tensor_sums is not None:
                    h.update(piece)
                yield piece
            if tensor_sums is not None:
                tensor_sums[name] = h.hexdigest()

    sha = write_atomic(path, chunks())
    assert sha is not None
    return sha


def write_atomic(target: Path, chunks: Iterable[bytes], digest: bool = True) -> str | None:
    """Write `chunks` to `target` crash-safely (written aside, fsynced, renamed into place); returns their sha256
    (None with `digest=False`, for callers that hashed the data already)."""
    h = hashlib.sha256() if digest else None
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                if h is not None:
                    h.update(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest() if h is not None else None
