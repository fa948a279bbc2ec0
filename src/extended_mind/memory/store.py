"""Saved memories: a directory with a manifest and content-addressed safetensors files, written crash-safely.

    DIR/manifest.json                  format, version, model identity, settings, and per document: id, name, text,
                                       length, text checksum, token range, tensor file and its checksum, and the
                                       checksum of each of its tensors (format 3; format 2 memories still load)
    DIR/tensors/<sha256>.safetensors   one file per document (keys, values, positions, spans), the rotary tables, and
                                       what the engine saves with large memories (indexes, prepared keys: derived.py)
    DIR/.lock                          held while a save is in progress

A save writes only the tensor files that are not there yet (a file's name is the sha256 of its bytes, so a file
that exists holds exactly the wanted bytes), fsyncs them, replaces manifest.json atomically (write aside, fsync,
rename, fsync the directory), and only then deletes files the new manifest does not name. A kill at any moment
leaves either the old manifest with all its files or the new one with all of its. Opening reads the manifest and
checks file sizes; a document's tensors are memory-mapped (mapped.py), each tensor's checksum verified the first
time it is used (a format-2 memory: the whole file's, on first use).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as save_bytes

from extended_mind.base.documents import Document
from extended_mind.base.errors import MemoryConflictError, MemoryFileError
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.version import __version__
from extended_mind.memory.derived import DerivedTensors, load_derived, store_derived
from extended_mind.memory.files import (
    TENSOR_DIR,
    CheckedTensors,
    StoredFile,
    fsync_dir,
    put_bytes,
    store_segment,
    stored_file,
)
from extended_mind.memory.mapped import write_atomic
from extended_mind.memory.precision import STORAGE_DTYPES
from extended_mind.memory.segment import RopeTables, Segment
from extended_mind.retrieval.index import LayerIndex

if TYPE_CHECKING:  # the memory imports this module, not the other way round
    from extended_mind.memory.memory import Memory

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None


log = logging.getLogger(__name__)


FORMAT_NAME = "extended-mind-memory"


FORMAT_VERSION = 3


# versions this extended-mind reads: 2 has no per-tensor checksums (its documents' files are checked whole)
READABLE_VERSIONS = (2, 3)


MANIFEST = "manifest.json"


_LOCK = ".lock"


# the engine's relevance calibrations saved in the manifest (one per block setting and prompt set: the latest few)
CALIBRATIONS_SAVED = 4


@dataclass(frozen=True)
class SavedIndex:
    """Approximate-search indexes saved with a memory: read (checksum verified) when first called."""

    file: StoredFile
    num_layers: int
    num_heads: int

    def __call__(self, num_keys: int) -> list:
        """The per-layer indexes, checked to describe `num_keys` memory keys."""
        tensors = self.file.read()
        try:
            return [LayerIndex.from_tensors(tensors, layer, num_keys) for layer in range(self.num_layers)]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MemoryFileError(f"corrupt search index {self.file.path}: {exc}") from None


def _store_indexes(memory: Memory, directory: Path) -> list[tuple[str, SavedIndex]]:
    out = []
    for fingerprint, found in memory.indexes.items():
        if isinstance(found, SavedIndex):
            if found.file.path.parent.resolve() == directory.resolve() and found.file.path.is_file():
                out.append((fingerprint, found))
                continue
            found = found(memory.num_tokens)
        if not isinstance(found, list) or not found:
            continue
        tensors = {name: t for layer, li in enumerate(found) for name, t in li.to_tensors(layer).items()}
        stored = put_bytes(directory, save_bytes(tensors, metadata={"format": "extended-mind-index-ivf"}))
        out.append((fingerprint, SavedIndex(stored, len(found), int(found[0].centroids.shape[0]))))
    return out


_held = threading.local()  # the memory directories whose lock this thread holds (the lock is reentrant)


@contextlib.contextmanager
def edit_lock(path: str | Path) -> Iterator[None]:
    """Hold the memory directory's lock: saves by other processes and threads wait until it is released. Hold it
    over a whole load-edit-save (`with edit_lock(d): m = Memory.load(d); ...; m.save()`) so that concurrent edits
    apply one after the other; a save takes it too (this thread may hold it already)."""
    path = Path(path)
    key = str(path.resolve())
    held = _held.__dict__.setdefault("paths", set())
    if fcntl is None or key in held:  # pragma: no cover - Windows: no advisory lock
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    with open(path / _LOCK, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def manifest_state(raw: bytes) -> str:
    """The state of a saved memory: the sha256 of its manifest's bytes (changes with every save)."""
    return hashlib.sha256(raw).hexdigest()


def check_save_target(path: Path) -> None:
    """Refuse to save into a file, or into a directory that holds something other than a memory."""
    if path.exists() and not path.is_dir():
        raise MemoryFileError(f"cannot save a memory to {path}: it is a file, not a directory")
    if path.is_dir() and not (path / MANIFEST).is_file() and any(p.name != _LOCK for p in path.iterdir()):
        raise MemoryFileError(f"cannot save a memory to {path}: the directory exists and is not a saved memory")
    if (path / MANIFEST).is_file():
        _read_manifest(path)  # refuses to overwrite a memory of an unknown (newer) format


def _check_not_changed(memory: Memory, path: Path, state: str) -> None:
    """Refuse to save over a memory (whose manifest is now in `state`) that another writer saved after this copy was
    loaded or saved there: its edits would be lost without a word."""
    if memory.path is None or memory.saved_state is None or Path(memory.path).resolve() != path.resolve():
        return  # a memory saved over another one on purpose (a new memory written to its directory)
    if state != memory.saved_state:
        raise MemoryConflictError(
            f"the memory in {path} was changed by another writer after this copy of it was loaded; nothing was "
            "written: load it again and repeat the edit (hold store.edit_lock over load, edit and save to make "
            "concurrent edits wait for each other)"
        )


def _document_entry(segment: Segment, file: StoredFile, start: int) -> dict:
    """A document's manifest entry: its text and settings, its token range from `start`, its file's checksums."""
    d = segment.document
    text_sha = hashlib.sha256(d.text.encode()).hexdigest()
    return {"id": d.id, "name": d.name, "chars": len(d.text), "text_sha256": text_sha,
            "tokens": [start, start + segment.num_tokens], "stride": segment.stride, "window": segment.window,
            "storage": segment.storage, "file": f"{TENSOR_DIR}/{file.path.name}", "sha256": file.sha256,
            "bytes": file.size, "tensors": dict(file.tensor_sha256 or {}), "context": segment.context,
            "text": d.text}  # fmt: skip


def save_memory(memory: Memory, path: Path, checked: bool = False) -> Path:
    """Write `memory` to `path`; `checked`: the target was checked before other writers (the ranks of a sharded
    memory) put tensor files there."""
    if not checked:
        check_save_target(path)
    tensor_dir = path / TENSOR_DIR
    tensor_dir.mkdir(parents=True, exist_ok=True)
    with edit_lock(path):
        if (path / MANIFEST).is_file():
            current = (path / MANIFEST).read_bytes()  # once: its format and its state
            _parse_manifest(path, current)  # refuses to overwrite a memory of an unknown (newer) format
            _check_not_changed(memory, path, manifest_state(current))
        stored = [store_segment(s, tensor_dir) for s in memory.segments]
        starts = [0]
        for s in memory.segments:
            starts.append(starts[-1] + s.num_tokens)
        documents = [_document_entry(s, f, start) for s, f, start in zip(memory.segments, stored, starts)]
        # cloned: safetensors refuses tensors that share storage, and the tables are small
        rope_tensors = {f"cos.{t}": c.clone() for t, c in enumerate(memory.rope.cos)}
        rope_tensors |= {f"sin.{t}": s.clone() for t, s in enumerate(memory.rope.sin)}
        rope = put_bytes(tensor_dir, save_bytes(rope_tensors, metadata={"format": "extended-mind-rope"}))
        indexes = _store_indexes(memory, tensor_dir)
        prepared = store_derived(memory.prepared_keys, tensor_dir)
        fsync_dir(tensor_dir)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "written_by": f"extended-mind {__version__}",
            "model": memory.identity.to_dict(),
            "storage": memory.storage,
            "stride": memory.stride,
            "window": memory.window,
            "positions": "each token's position inside its memorization window (policies: zero, stored)",
            "num_layers": memory.num_layers,
            "num_tokens": memory.num_tokens,
            "layer_rope": memory.rope.layer_rope,
            "kv_shapes": [list(x) for x in memory.rope.kv_shapes],
            "rope": {"file": f"{TENSOR_DIR}/{rope.path.name}", "sha256": rope.sha256, "bytes": rope.size},
            "documents": documents,
            "indexes": [
                {
                    "fingerprint": fp,
                    "layers": ix.num_layers,
                    "heads": ix.num_heads,
                    "file": f"{TENSOR_DIR}/{ix.file.path.name}",
                    "sha256": ix.file.sha256,
                    "bytes": ix.file.size,
                }
                for fp, ix in indexes
            ],  # fmt: skip
            "calibrations": dict(list(memory.calibrations.items())[-CALIBRATIONS_SAVED:]),
            "prepared": prepared,
        }
        raw = json.dumps(manifest, ensure_ascii=False, indent=1).encode()
        write_atomic(path / MANIFEST, [raw], digest=False)
        fsync_dir(path)
        memory.saved_state = manifest_state(raw)
        for s, f in zip(memory.segments, stored):
            s.file = f
        keep = {f.path.name for f in stored} | {rope.path.name} | {ix.file.path.name for _, ix in indexes}
        keep |= {Path(e["file"]).name for e in prepared}
        for p in tensor_dir.iterdir():  # no manifest refers to these any more (or they are leftovers of a crash)
            if p.name not in keep:
                p.unlink(missing_ok=True)
        (path / "tensors.safetensors").unlink(missing_ok=True)  # format 1's single file
    return path


def _read_manifest(path: Path) -> dict:
    return _parse_manifest(path, (path / MANIFEST).read_bytes())


def _parse_manifest(path: Path, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemoryFileError(f"corrupt memory manifest in {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path / MANIFEST} is not an extended-mind memory manifest")
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        hint = (
            "written by a newer extended-mind: upgrade to read it"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "memorize the documents again to rebuild it"
        )
        raise MemoryFileError(
            f"memory {path} has format version {version!r}; this extended-mind reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} ({hint})"
        )
    return manifest


def _segment_loader(stored: StoredFile, n: int, shapes: list, storage: str, what: str):
    def load() -> Mapping[str, torch.Tensor]:
        tensors = stored.map()
        if isinstance(tensors, CheckedTensors):  # from the header: no tensor is read to check its shape
            shapes_found = tensors.shapes
        else:
            shapes_found = {k: tuple(t.shape) for k, t in tensors.items()}
        expected = {"positions": (n,), "spans": (n, 2)}
        for layer, (h, dk, dv) in enumerate(shapes):
            expected[f"keys.{layer}"] = (h, n, dk)
            expected[f"values.{layer}"] = (h, n, dv)
            if storage == "int8":
                expected[f"key_scales.{layer}"] = (h, n)
                expected[f"value_scales.{layer}"] = (h, n)
        for name, shape in expected.items():
            if shapes_found.get(name) != shape:
                raise MemoryFileError(f"corrupt memory file {stored.path} ({what}): tensor {name} missing or misshapen")
        return tensors

    return load


@dataclass
class LoadedMemory:
    """What a saved memory's manifest describes: the parts `Memory.load` builds a memory from (tensors unread)."""

    identity: ModelIdentity
    segments: list[Segment]
    rope: RopeTables
    stride: int
    window: int
    storage: str
    saved_state: str
    indexes: dict[str, SavedIndex]
    calibrations: dict[str, dict]
    prepared: dict[str, DerivedTensors]


def load_memory(path: Path) -> LoadedMemory:
    if not (path / MANIFEST).is_file():
        raise MemoryFileError(f"not a saved memory (no {MANIFEST}): {path}")
    raw = (path / MANIFEST).read_bytes()  # once: the manifest and its state are the same version
    manifest = _parse_manifest(path, raw)
    state = manifest_state(raw)
    try:
        shapes = [tuple(int(x) for x in s) for s in manifest["kv_shapes"]]
        layer_rope = [int(x) for x in manifest["layer_rope"]]
        if len(shapes) != int(manifest["num_layers"]) or len(layer_rope) != len(shapes):
            raise ValueError("layer counts disagree")
        rope_file = stored_file(path, manifest["rope"], "the rotary tables")
        segments, start = [], 0
        for entry in manifest["documents"]:
            what = f"document {entry['id']!r}"
            lo, hi = (int(x) for x in entry["tokens"])
            storage = str(entry["storage"])
            text = str(entry["text"])
            context = str(entry.get("context", "sink"))  # memories saved before it was recorded: the sink
            if lo != start or hi < lo or storage not in STORAGE_DTYPES or context not in ("sink", "chat"):
                raise ValueError(f"bad token range, storage or context for {what}")
            if hashlib.sha256(text.encode()).hexdigest() != entry["text_sha256"]:
                raise MemoryFileError(f"corrupt memory manifest in {path}: the text of {what} fails its checksum")
            stored = stored_file(path, entry, what, per_tensor=int(manifest["version"]) >= 3)
            segment = Segment(
                Document(str(entry["id"]), text, entry["name"]),
                hi - lo,
                int(entry["stride"]),
                int(entry["window"]),
                storage,
                load=_segment_loader(stored, hi - lo, shapes, storage, what),
                file=stored,
                context=context,
            )
            segments.append(segment)
            start = hi
        if start != int(manifest["num_tokens"]):
            raise ValueError("token count disagrees with the documents")
        rope_tensors = rope_file.read()
        n_tables = len(set(layer_rope))
        rope = RopeTables(
            cos=[rope_tensors[f"cos.{t}"] for t in range(n_tables)],
            sin=[rope_tensors[f"sin.{t}"] for t in range(n_tables)],
            layer_rope=layer_rope,
            kv_shapes=shapes,
        )
        indexes = {}
        for entry in manifest.get("indexes", []):
            stored = stored_file(path, entry, "a search index")
            indexes[str(entry["fingerprint"])] = SavedIndex(stored, int(entry["layers"]), int(entry["heads"]))
        calibrations = manifest.get("calibrations", {})
        if not isinstance(calibrations, dict) or not all(isinstance(v, dict) for v in calibrations.values()):
            # derived data, computed again when missing: a damaged entry must not make the documents unreadable
            log.warning("memory %s: its saved calibrations are malformed and are ignored", path)
            calibrations = {}
        return LoadedMemory(ModelIdentity.from_dict(manifest["model"]), segments, rope, int(manifest["stride"]),
                            int(manifest["window"]), str(manifest["storage"]), state, indexes,
                            calibrations, load_derived(path, manifest.get("prepared")))  # fmt: skip
    except MemoryFileError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise MemoryFileError(f"corrupt or incomplete memory manifest in {path}: {exc!r}") from None
