"""A memory: per-layer pre-RoPE keys and values of every memorized token, with provenance back to the documents.

A memory is a list of segments, one per document, each holding that document's tokens only. Documents are
memorized independently (no window crosses two documents), so adding, removing or replacing one never touches
the others, and adding documents one at a time gives the same memory as adding them together. The flat views the
attention layers read (all tokens of a layer in one tensor) are built on demand and dropped after every change.
Persistence (a directory with a manifest and one safetensors file per segment) lives in `memory/store.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from extended_mind.base.documents import Document
from extended_mind.base.errors import DocumentError, ExtendedMindError, MemoryMismatchError
from extended_mind.base.identity import ModelIdentity
from extended_mind.memory.derived import DerivedTensors
from extended_mind.memory.files import CheckedTensors, parallel_map
from extended_mind.memory.precision import check_storage
from extended_mind.memory.segment import RopeTables, Segment, concat, longest_rope, text_sha
from extended_mind.memory.sharded import save_sharded
from extended_mind.memory.store import MANIFEST, SavedIndex, load_memory, save_memory
from extended_mind.parallel.group import ShardGroup
from extended_mind.retrieval.index import LayerIndex


class Memory:
    """Keys/values of memorized documents for every layer of one model, and where each token came from.

    Edit in place with `add`, `remove` and `replace` (each touches only the documents named), persist with `save`
    (incremental: only new documents are written), open with `Memory.load` (lazy: tensors are read on first use)."""

    def __init__(
        self,
        identity: ModelIdentity,
        segments: list[Segment],
        rope: RopeTables,
        stride: int,
        window: int,
        storage: str,
        path: Path | None = None,
    ):
        self.identity = identity
        self.segments = segments
        self.rope = rope
        self.stride = stride  # settings for documents added later
        self.window = window
        self.storage = check_storage(storage)
        self.path = path  # where it was last saved or loaded from: `save()` with no path writes there
        self.saved_state: str | None = None  # the manifest at `path` then (store.manifest_state): saves check it
        self._flat: dict[str, Any] = {}
        self.prepared_layers: dict = {}
        # approximate-search indexes by fingerprint (index.memory_fingerprint): per layer LayerIndex, or a loader
        # of them when they were saved with the memory
        self.indexes: dict[str, list[LayerIndex] | SavedIndex] = {}
        # tables the engine derived from these documents and saved with them (its relevance calibrations: costly to
        # compute at a million tokens), by a key that names the documents; plain JSON, checked by the engine on use
        self.calibrations: dict[str, dict] = {}
        # block selection's prepared keys of a large memory (engine/prepared.py), held for a save or saved with it
        self.prepared_keys: dict[str, DerivedTensors] = {}
        # distributed.ShardGroup when this memory is sharded over processes (each holds the keys and values of
        # the documents assigned to its rank); None: every document is held here
        self.shard: ShardGroup | None = None

    # ---- what it holds ----

    @property
    def documents(self) -> list[Document]:
        return [s.document for s in self.segments]

    @property
    def model_source(self) -> str:
        return self.identity.source

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def num_layers(self) -> int:
        return len(self.rope.layer_rope)

    @property
    def nbytes(self) -> int:
        """Bytes of stored keys and values (the part that grows with the memory)."""
        return sum(s.nbytes for s in self.segments)

    def __repr__(self) -> str:
        return (
            f"Memory({len(self.segments)} documents, {self.num_tokens} tokens, {self.num_layers} layers, "
            f"storage={self.storage}, model={self.model_source!r})"
        )

    def __len__(self) -> int:
        return len(self.segments)

    def __contains__(self, doc_id: object) -> bool:
        return any(s.document.id == doc_id for s in self.segments)

    def info(self) -> dict:
        n = self.num_tokens
        return {
            "path": str(self.path) if self.path else None,
            "model": self.model_source,
            "documents": len(self.segments),
            "tokens": n,
            "layers": self.num_layers,
            "storage": self.storage,
            "stride": self.stride,
            "window": self.window,
            "bytes": self.nbytes,
            "bytes_per_token": round(self.nbytes / n, 1) if n else None,
        } | ({"shards": self.shard_layout()} if self.shard is not None else {})

    # ---- sharding (parallel/group.py) ----

    def shard_layout(self) -> list[dict]:
        """Per rank of a sharded memory: the documents and tokens it holds."""
        world = self.shard.world if self.shard is not None else 1
        rows = [{"rank": r, "documents": 0, "tokens": 0} for r in range(world)]
        for s in self.segments:
            row = rows[s.rank if s.rank is not None else 0]
            row["documents"] += 1
            row["tokens"] += s.num_tokens
        return rows

    def local_view(self) -> Memory:
        """The documents held by this process: the whole memory unless it is sharded. Shares tensors."""
        if self.shard is None:
            return self

        def build() -> Memory:
            view = Memory(self.identity, [s for s in self.segments if not s.remote], self.rope, self.stride,
                          self.window, self.storage)  # fmt: skip
            return view

        return self.cached("local-view", build)

    def local_to_global(self) -> torch.Tensor:
        """(N local,) long: the index in this memory of every token of `local_view()`."""

        def build() -> torch.Tensor:
            parts, start = [], 0
            for s in self.segments:
                if not s.remote:
                    parts.append(torch.arange(start, start + s.num_tokens))
                start += s.num_tokens
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

        return self.cached("local-to-global", build)

    # ---- flat views over all documents, as the attention layers read them ----

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._flat:
            self._flat[name] = build()
        return self._flat[name]

    @property
    def positions(self) -> torch.Tensor:
        """(N,) int32: each token's position inside its memorization window."""
        return self.cached("positions", lambda: concat([s.tensors["positions"] for s in self.segments], (0,)))

    @property
    def token_doc(self) -> torch.Tensor:
        """(N,) int32: index into `documents` of each token."""
        return self.cached(
            "token_doc",
            lambda: concat(
                [torch.full((s.num_tokens,), i, dtype=torch.int32) for i, s in enumerate(self.segments)], (0,)
            ),
        )

    @property
    def token_spans(self) -> torch.Tensor:
        """(N, 2) int32: character [start, end) of each token in its document."""
        return self.cached("spans", lambda: concat([s.tensors["spans"] for s in self.segments], (0, 2)))

    def open_all(self, check: list[str] | None = None) -> None:
        """Map every document held here now, and check the tensors named in `check` (keys.3, ...) of each, on
        several threads (hashing releases the GIL): a large memory's first use reads all of them anyway, one at a
        time otherwise. Files without per-tensor checksums are checked whole when mapped."""
        todo = [s for s in self.segments if not s.remote and (check or not s.is_open)]

        def open_one(s: Segment) -> None:
            tensors = s.tensors
            if check and isinstance(tensors, CheckedTensors):
                tensors.check(check)

        if len(todo) > 1 or (todo and check):
            parallel_map(open_one, todo)

    def layer_keys(self, layer: int) -> torch.Tensor:
        """(H, N, D) pre-RoPE keys of one layer as float, built fresh (not cached)."""
        h, dk, _ = self.rope.kv_shapes[layer]
        return concat([s.layer("keys", layer) for s in self.segments], (h, 0, dk), dim=1)

    def layer_values(self, layer: int) -> torch.Tensor:
        h, _, dv = self.rope.kv_shapes[layer]
        return concat([s.layer("values", layer) for s in self.segments], (h, 0, dv), dim=1)

    def token_rows(self, kind: str, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Keys or values (`kind`) of one layer for memory tokens `tokens` (S,) in ascending order: (H, S, D), as
        `layer_keys` / `layer_values` hold them, decoded from the stored segments (only those rows)."""
        h, dk, dv = self.rope.kv_shapes[layer]
        parts, start, tokens = [], 0, tokens.long().cpu()
        for s in self.segments:
            lo, hi = torch.searchsorted(tokens, torch.tensor([start, start + s.num_tokens])).tolist()
            if hi > lo:
                parts.append(s.layer(kind, layer, tokens[lo:hi] - start))
            start += s.num_tokens
        return concat(parts, (h, 0, dk if kind == "keys" else dv), dim=1)

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer (H, N, D) pre-RoPE keys (cached; for inspection and tests, generation uses `layer_keys`)."""
        if "keys" not in self._flat:
            self._flat["keys"] = [self.layer_keys(i) for i in range(self.num_layers)]
        return self._flat["keys"]

    @property
    def values(self) -> list[torch.Tensor]:
        if "values" not in self._flat:
            self._flat["values"] = [self.layer_values(i) for i in range(self.num_layers)]
        return self._flat["values"]

    def changed(self) -> None:
        self._flat.clear()
        self.prepared_layers.clear()
        self.indexes.clear()  # built over the old documents
        self.calibrations.clear()
        self.prepared_keys.clear()

    def content_key(self) -> list[tuple]:
        """What determines the memory's keys, per document in order (see index.memory_fingerprint); ids and names
        do not, so a renamed view of a memory shares its indexes."""
        # (a document memorized after the chat head adds that: memories made before it keep their keys)
        return [(text_sha(s.document.text), s.num_tokens, s.storage, s.stride, s.window)
                + (() if s.context == "sink" else (s.context,)) for s in self.segments]  # fmt: skip

    # ---- model checks and combining ----

    def check_model(self, identity: ModelIdentity) -> None:
        self.identity.check(identity)

    def _check_compatible(self, other: Memory) -> None:
        try:
            other.identity.check(self.identity)
        except MemoryMismatchError as exc:
            raise MemoryMismatchError(f"cannot combine memories: {exc}") from None

    @classmethod
    def merge(cls, memories: Sequence[Memory]) -> Memory:
        """One memory holding the documents of all `memories` (same model; document ids must stay unique).
        Tensors are shared, not copied."""
        if len(memories) == 1:
            return memories[0]
        first = memories[0]
        for m in memories[1:]:
            first._check_compatible(m)
        ids = [d.id for m in memories for d in m.documents]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise MemoryMismatchError(f"cannot combine memories: duplicate document ids {dup}")
        merged = cls(
            first.identity,
            [s for m in memories for s in m.segments],
            longest_rope([m.rope for m in memories]),
            first.stride,
            first.window,
            first.storage,
        )
        merged.shard = next((m.shard for m in memories if m.shard is not None), None)
        return merged

    # ---- editing: each operation touches only the documents it names ----

    def add(self, documents: Memory) -> Memory:
        """Append the documents of `documents`, a memory of the same model and settings (memorize texts with
        `ExtendedMind.add`, which calls this). Ids must be new (use `replace` to change a document). Returns self."""
        if not isinstance(documents, Memory):
            raise ExtendedMindError(
                f"Memory.add takes a Memory, got {type(documents).__name__}: a memory is data and does not hold the "
                "model; memorize texts or files with ExtendedMind.add(memory, documents)"
            )
        self._check_compatible(documents)
        dup = sorted({d.id for d in self.documents} & {d.id for d in documents.documents})
        if dup:
            raise DocumentError(f"document ids {dup} are already in the memory (use replace to change them)")
        self.segments = self.segments + [s.astype(self.storage, self.num_layers) for s in documents.segments]
        self.rope = longest_rope([self.rope, documents.rope])
        self.changed()
        return self

    def index_of(self, doc_id: str) -> int:
        """The position of document `doc_id` (a clear error naming the documents when there is none)."""
        for i, s in enumerate(self.segments):
            if s.document.id == doc_id:
                return i
        known = ", ".join(repr(d.id) for d in self.documents[:20]) or "none"
        raise DocumentError(f"no document {doc_id!r} in the memory (documents: {known})")

    def remove(self, doc_ids: str | list[str]) -> Memory:
        """Drop the named documents and every token memorized from them. Returns self."""
        names = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        drop = {self.index_of(d) for d in names}
        self.segments = [s for i, s in enumerate(self.segments) if i not in drop]
        self.changed()
        return self

    def replace(self, doc_id: str, document: Memory) -> Memory:
        """Put the one document of `document` (a memory of the same model) in the place of document `doc_id`, under
        that id (memorize the new text with `ExtendedMind.replace`, which calls this). Returns self."""
        i = self.index_of(doc_id)
        if not isinstance(document, Memory) or len(document.segments) != 1:
            raise ExtendedMindError(
                "Memory.replace takes a Memory of one document; memorize the new text with "
                "ExtendedMind.replace(memory, doc_id, text)"
            )
        self._check_compatible(document)
        segment = document.segments[0].astype(self.storage, self.num_layers)
        old = self.segments[i].document
        name = segment.document.name if segment.document.name is not None else old.name
        segment.document = Document(doc_id, segment.document.text, name)
        self.segments = [*self.segments[:i], segment, *self.segments[i + 1 :]]
        self.rope = longest_rope([self.rope, document.rope])
        self.changed()
        return self

    def astype(self, storage: str) -> Memory:
        """A copy of this memory with keys/values stored in `storage` (float32, bfloat16, float16, int8)."""
        check_storage(storage)
        copy = Memory(
            self.identity,
            [s.astype(storage, self.num_layers) for s in self.segments],
            self.rope,
            self.stride,
            self.window,
            storage,
        )
        return copy

    # ---- persistence (see memory/store.py) ----

    def save(self, path: str | Path | None = None) -> Path:
        """Write the memory to directory `path` (default: where it was loaded from or last saved). Only documents
        not yet in that directory are written; the manifest is swapped atomically, so a crash leaves either the
        previous or the new memory, both complete."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ExtendedMindError("this memory has never been saved: give a directory to save it to")
        if self.shard is not None:
            self.path = save_sharded(self, target)
            return self.path
        self.path = save_memory(self, target)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Memory:
        """Open a saved memory. Tensors are memory-mapped (their checksums verified) on first use."""
        path = Path(path)
        loaded = load_memory(path)
        memory = cls(loaded.identity, loaded.segments, loaded.rope, loaded.stride, loaded.window, loaded.storage, path)
        memory.saved_state = loaded.saved_state
        memory.indexes.update(loaded.indexes)
        memory.calibrations.update(loaded.calibrations)
        memory.prepared_keys.update(loaded.prepared)
        return memory

    def verify(self) -> None:
        """Hash every tensor file now (even ones verified before) and check its tensors (raises MemoryFileError on
        corruption)."""
        for s in self.segments:
            if s.file is not None and not s.remote:
                s.file.check(remembered_ok=False)
            tensors = s.tensors  # reading is the check (shapes, header)
            if isinstance(tensors, CheckedTensors):  # and each tensor against the manifest's checksum
                tensors.check(list(tensors), remembered_ok=False)
        for derived in self.prepared_keys.values():  # saved with it: a damaged one would be prepared again, but say so
            if derived.file is not None:
                derived.file.check(remembered_ok=False)


def is_saved_memory(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
