"""A memory: per-layer pre-RoPE keys and values of every memorized token, with provenance back to the documents."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .documents import Document
from .errors import MemoryFileError, MemoryMismatchError

FORMAT_NAME = "extended-mind-memory"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_TENSORS = "tensors.safetensors"


@dataclass
class Memory:
    """Keys/values of memorized tokens for every layer, and where each token came from.

    Shapes (N memory tokens, H KV heads, D head dim, P rope positions, R rotary dims):
      keys[l], values[l]: (H, N, D), keys before RoPE
      positions: (N,) the token's position inside the window it was memorized in
      token_doc: (N,) index into `documents`; token_spans: (N, 2) character [start, end) in that document
      rope_cos[t], rope_sin[t]: (P, R) the model's rotary tables; layer_rope[l] picks the table of layer l
    """

    model_fingerprint: str
    model_source: str
    documents: list[Document]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    token_doc: torch.Tensor
    token_spans: torch.Tensor
    rope_cos: list[torch.Tensor]
    rope_sin: list[torch.Tensor]
    layer_rope: list[int]
    stride: int
    window: int
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (
            f"Memory({len(self.documents)} documents, {self.num_tokens} tokens, {self.num_layers} layers, "
            f"model={self.model_source!r})"
        )

    def check_model(self, fingerprint: str, source: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise MemoryMismatchError(
                f"memory was built by a different model ({self.model_source!r}) than the one loaded ({source!r}); "
                "memorize the documents again with this model"
            )

    @classmethod
    def merge(cls, memories: list[Memory]) -> Memory:
        """Concatenate memories built by the same model into one (document ids must stay unique)."""
        if len(memories) == 1:
            return memories[0]
        first = memories[0]
        for m in memories[1:]:
            if m.model_fingerprint != first.model_fingerprint:
                raise MemoryMismatchError(
                    f"cannot combine memories of different models ({first.model_source!r}, {m.model_source!r})"
                )
        ids = [d.id for m in memories for d in m.documents]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise MemoryMismatchError(f"cannot combine memories: duplicate document ids {dup}")
        doc_offsets, offset = [], 0
        for m in memories:
            doc_offsets.append(offset)
            offset += len(m.documents)
        # Rotary tables of one model agree on their common prefix; the longest covers every stored position.
        n_tables = len(first.rope_cos)
        longest = [max(memories, key=lambda m: m.rope_cos[t].shape[0]) for t in range(n_tables)]
        return cls(
            model_fingerprint=first.model_fingerprint,
            model_source=first.model_source,
            documents=[d for m in memories for d in m.documents],
            keys=[torch.cat([m.keys[layer] for m in memories], dim=1) for layer in range(first.num_layers)],
            values=[torch.cat([m.values[layer] for m in memories], dim=1) for layer in range(first.num_layers)],
            positions=torch.cat([m.positions for m in memories]),
            token_doc=torch.cat([m.token_doc + o for m, o in zip(memories, doc_offsets)]),
            token_spans=torch.cat([m.token_spans for m in memories]),
            rope_cos=[longest[t].rope_cos[t] for t in range(n_tables)],
            rope_sin=[longest[t].rope_sin[t] for t in range(n_tables)],
            layer_rope=list(first.layer_rope),
            stride=first.stride,
            window=first.window,
        )

    # ---- persistence: a directory with a JSON manifest and one safetensors file, replaced atomically ----

    def save(self, path: str | Path) -> Path:
        """Write the memory to directory `path`; an existing memory there is replaced only once the new one is
        complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors = {"positions": self.positions, "token_doc": self.token_doc, "token_spans": self.token_spans}
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                tensors[f"keys.{layer}"] = k
                tensors[f"values.{layer}"] = v
            for t, (c, s) in enumerate(zip(self.rope_cos, self.rope_sin)):
                tensors[f"rope_cos.{t}"] = c
                tensors[f"rope_sin.{t}"] = s
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / _TENSORS)
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "model_fingerprint": self.model_fingerprint,
                "model_source": self.model_source,
                "num_tokens": self.num_tokens,
                "num_layers": self.num_layers,
                "layer_rope": self.layer_rope,
                "stride": self.stride,
                "window": self.window,
                "documents": [{"id": d.id, "name": d.name, "text": d.text} for d in self.documents],
            }
            (tmp / _MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            backup = None
            if path.exists():
                backup = path.with_name(f".{path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(path, backup)
            os.replace(tmp, path)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Memory:
        path = Path(path)
        if not (path / _MANIFEST).is_file():
            raise MemoryFileError(f"not a saved memory (no {_MANIFEST}): {path}")
        try:
            manifest = json.loads((path / _MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MemoryFileError(f"corrupt memory manifest in {path}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise MemoryFileError(f"{path / _MANIFEST} is not an extended-mind memory manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise MemoryFileError(
                f"memory {path} has format version {manifest.get('version')}; this version reads {FORMAT_VERSION}"
            )
        try:
            t = load_file(path / _TENSORS)
            n_layers, n_tables = manifest["num_layers"], len(set(manifest["layer_rope"]) - {-1})
            memory = cls(
                model_fingerprint=manifest["model_fingerprint"],
                model_source=manifest["model_source"],
                documents=[Document(id=d["id"], text=d["text"], name=d["name"]) for d in manifest["documents"]],
                keys=[t[f"keys.{i}"] for i in range(n_layers)],
                values=[t[f"values.{i}"] for i in range(n_layers)],
                positions=t["positions"],
                token_doc=t["token_doc"],
                token_spans=t["token_spans"],
                rope_cos=[t[f"rope_cos.{i}"] for i in range(n_tables)],
                rope_sin=[t[f"rope_sin.{i}"] for i in range(n_tables)],
                layer_rope=list(manifest["layer_rope"]),
                stride=int(manifest["stride"]),
                window=int(manifest["window"]),
            )
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise MemoryFileError(f"corrupt or incomplete memory at {path}: {exc}") from None
        if memory.num_tokens != manifest["num_tokens"] or any(k.shape[1] != memory.num_tokens for k in memory.keys):
            raise MemoryFileError(f"corrupt memory at {path}: tensor sizes disagree with the manifest")
        return memory


def is_saved_memory(path: str | Path) -> bool:
    return (Path(path) / _MANIFEST).is_file()
