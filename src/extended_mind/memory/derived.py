"""Tensors the engine derives from a large memory's documents and saves with them, so that its first open on any
machine need not compute them: block selection's prepared keys (engine/prepared.py: the selection layers' keys
gathered into one tensor per layer, their inverse norms and the scan's int8 codes; 8.7 s to prepare at 270k tokens
from a cold disk, the largest part of a first open).

A save writes each as `DIR/tensors/<sha256>.safetensors` (streamed, crash-safe, like a document's file) with the
checksum of every tensor, listed in the manifest's "prepared" entries under the key the engine gave it (what it was
derived from: documents, model, setting, scan). A tensor is checked the first time it is used. Derived data: an
entry that is malformed or whose file is missing is ignored with a warning, and the engine prepares again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from extended_mind.base.errors import MemoryFileError
from extended_mind.memory.files import StoredFile, stored_file
from extended_mind.memory.mapped import remember_checked, write_safetensors

log = logging.getLogger(__name__)


@dataclass
class DerivedTensors:
    """Tensors derived from a memory's documents: held in memory until a save writes them (`tensors`), or saved
    with the memory (`file`); `meta`: what the engine needs besides the tensors (plain JSON)."""

    meta: dict
    tensors: Mapping[str, torch.Tensor] | None = None
    file: StoredFile | None = None

    def open(self) -> Mapping[str, torch.Tensor]:
        """The tensors (a saved file's are mapped, each checked when first used: MemoryFileError if one fails)."""
        if self.tensors is not None:
            return self.tensors
        assert self.file is not None
        return self.file.map()


def write_tensors(directory: Path, tensors: Mapping[str, torch.Tensor]) -> StoredFile:
    """Write `tensors` into `directory` as `<sha256>.safetensors`, streamed and crash-safe, with per-tensor
    checksums (hashed as written)."""
    partial = directory / f".partial-{os.getpid()}.safetensors"  # a save deletes files its manifest does not name
    sums: dict[str, str] = {}
    sha = write_safetensors(partial, dict(tensors), metadata={"format": "extended-mind-derived"}, tensor_sums=sums)
    target = directory / f"{sha}.safetensors"
    os.replace(partial, target)
    remember_checked(target, sha, recent_ok=True)  # just written: this process need not hash it again
    return StoredFile(target, sha, target.stat().st_size, sums)


def store_derived(derived: dict[str, DerivedTensors], directory: Path) -> list[dict]:
    """Save every entry of `derived` into tensor directory `directory` (a file already there is kept) and return
    their manifest entries ("file" relative to the memory's directory). Entries saved elsewhere are copied, each
    tensor checked as it is read; one that fails is dropped with a warning."""
    entries = []
    for key, item in list(derived.items()):
        file = item.file
        if item.tensors is not None or file is None or file.path.parent.resolve() != directory.resolve():
            try:
                file = write_tensors(directory, item.open())
            except MemoryFileError as exc:
                log.warning("prepared keys not saved with the memory (%s): they are prepared again when needed", exc)
                del derived[key]
                continue
            derived[key] = DerivedTensors(item.meta, file=file)  # the copy in memory is no longer needed
        entries.append({"key": key, "file": f"{directory.name}/{file.path.name}", "sha256": file.sha256,
                        "bytes": file.size, "tensors": dict(file.tensor_sha256 or {}), "meta": item.meta})  # fmt: skip
    return entries


def load_derived(path: Path, entries: object) -> dict[str, DerivedTensors]:
    """The manifest's "prepared" entries of the memory at `path`; malformed or missing ones are left out with a
    warning (the documents stay readable)."""
    out: dict[str, DerivedTensors] = {}
    for entry in entries if isinstance(entries, list) else []:
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict):
                raise ValueError("malformed entry")
            out[str(entry["key"])] = DerivedTensors(entry["meta"], file=stored_file(path, entry, "prepared keys",
                                                                                    per_tensor=True))  # fmt: skip
        except (MemoryFileError, KeyError, TypeError, ValueError) as exc:
            log.warning("memory %s: saved prepared keys ignored (%s): they are prepared again when needed", path, exc)
    if entries is not None and not isinstance(entries, list):
        log.warning("memory %s: its saved prepared keys are malformed and are ignored", path)
    return out
