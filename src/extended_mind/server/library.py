"""Named memories kept in one directory (`<memory_dir>/<name>/`, each a saved `Memory`), loaded on first use.

The library only touches disk and bookkeeping; memorizing runs on the model worker (see worker.py), which also
runs every call here that changes a memory, so edits and generations never interleave."""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from pathlib import Path

from extended_mind.base.documents import Document
from extended_mind.base.errors import MemoryConflictError
from extended_mind.engine.mind import ExtendedMind
from extended_mind.memory.memory import Memory, is_saved_memory
from extended_mind.memory.segment import longest_rope
from extended_mind.server.errors import APIError
from extended_mind.server.schemas import MEMORY_NAME_PATTERN

_NAME = re.compile(MEMORY_NAME_PATTERN)


def check_name(name: str) -> str:
    """Memory names become directory names: letters, digits, '_', '.', '-' only (no '/', no leading '.')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(
            400,
            f"invalid memory name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit",
            "invalid_name",
            "name",
        )
    return name


class MemoryLibrary:
    def __init__(self, root: Path, mind: ExtendedMind):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mind = mind
        self._lock = threading.RLock()
        self._loaded: dict[str, Memory] = {}
        self._versions: dict[str, int] = {}
        self._views: dict[tuple, Memory] = {}  # merged, namespaced memories of recent requests
        # sharded serving (sharded.py): the memories opened at start, not to be changed through the server
        self.read_only = False
        self._clean_trash()

    def _clean_trash(self) -> None:
        # a delete renames the directory first, so an interrupted delete leaves only ".trash-*" behind
        for path in self.root.glob(".trash-*"):
            shutil.rmtree(path, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if self.read_only:
            return sorted(self._loaded)
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and is_saved_memory(p))

    def exists(self, name: str) -> bool:
        if self.read_only:
            return check_name(name) in self._loaded
        return is_saved_memory(self.path(name))

    def check_writable(self) -> None:
        if self.read_only:
            raise APIError(
                409,
                "memories cannot be changed through a sharded server (started with torchrun): change them with "
                "`extended-mind memory ...` or the Python API, then restart the server",
                "memory_read_only",
            )

    def get(self, name: str) -> Memory:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if self.read_only:
                raise APIError(404, f"no memory named {name!r} was opened when the sharded server started",
                               "memory_not_found", "memory")  # fmt: skip
            if not self.exists(name):
                raise APIError(404, f"no memory named {name!r}", "memory_not_found", "memory")
            memory = self.mind.load_memory(self.path(name))
            self._loaded[name] = memory
            self._versions.setdefault(name, 0)
            return memory

    def open_memories(self) -> dict[str, Memory]:
        """The memories loaded so far, by name (for metrics: nothing is loaded to answer)."""
        with self._lock:
            return dict(self._loaded)

    def put(self, name: str, memory: Memory) -> None:
        """Save `memory` under `name` (atomic: readers see the old or the new memory) and use it from now on."""
        with self._lock:
            memory.save(self.path(name))
            self._loaded[name] = memory
            self._changed(name)

    def saved(self, name: str) -> None:
        """Persist an edited loaded memory."""
        with self._lock:
            try:
                self._loaded[name].save()
            except MemoryConflictError:  # changed on disk by another process: its version is read on next use
                self._loaded.pop(name, None)
                self._changed(name)
                raise
            self._changed(name)

    def delete(self, name: str) -> None:
        with self._lock:
            if not self.exists(name):
                raise APIError(404, f"no memory named {name!r}", "memory_not_found", "name")
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            self.path(name).rename(trash)  # atomic: the name is gone at once, even if the removal is cut short
            self._loaded.pop(name, None)
            self._changed(name)
        shutil.rmtree(trash, ignore_errors=True)

    def _changed(self, name: str) -> None:
        self._versions[name] = self._versions.get(name, 0) + 1
        self._views = {k: v for k, v in self._views.items() if name not in k[0]}

    def memory_for(self, names: list[str]) -> Memory | None:
        """What a request naming `names` reads: their view, or None when it names none or every document was
        removed."""
        memory = self.view(names) if names else None
        return memory if memory is not None and memory.num_tokens else None

    def view(self, names: list[str]) -> Memory:
        """One memory over the named memories whose documents are called "<memory>/<document id>", so citations
        say which memory they come from and equal document ids in two memories do not clash. Tensors are shared
        with the stored memories, and the view (with its prepared keys) is reused while none of them changes."""
        with self._lock:
            memories = [self.get(n) for n in names]
            key = (tuple(names), tuple(self._versions[n] for n in names))
            view = self._views.get(key)
            if view is None:
                segments = [
                    s.read_through(Document(f"{n}/{s.document.id}", s.document.text, s.document.name))
                    for n, m in zip(names, memories)
                    for s in m.segments
                ]
                first = memories[0]
                rope = longest_rope([m.rope for m in memories])
                view = Memory(first.identity, segments, rope, first.stride, first.window, first.storage)
                view.indexes = dict(first.indexes) if len(memories) == 1 else {}  # same keys: share saved indexes
                view.calibrations = dict(first.calibrations) if len(memories) == 1 else {}
                view.mind = self.mind
                view.shard = first.shard  # segments keep their ranks
                self._views = {key: view}  # one view at a time: its prepared keys are as large as the memories
            return view


def split_document_id(doc: str) -> tuple[str, str]:
    """(memory, document id) from a view's "<memory>/<document id>"."""
    memory, _, doc_id = doc.partition("/")
    return memory, doc_id
