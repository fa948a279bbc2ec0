"""Block selection's prepared keys of large memories, saved with the memory and kept in the cache directory, so a
memory opened anywhere needs no preparation.

Block memory scans the keys of its selection layers with a compact copy (scan.py). Building that copy reads and
quantizes every key of those layers: for a million-token SmolLM2 memory, 8 layers x 3 KV heads x 64 dims x 1M keys,
tens of seconds at every start. The copy depends only on the memory's documents, the model and the scan kind, so
once prepared (keys in their stored precision, 1/|key|, the scan's codes) it is held by the memory and written with
it by its next save (`Memory.prepared_keys`, memory/derived.py: about a fifth of the memory's size; a first open
then maps it instead of preparing), and for a saved memory also written to `<cache>/prepared/<key>.safetensors`,
for memories saved before this existed. Only memories of at least PERSIST_MIN tokens; $EXTENDED_MIND_SAVE_PREPARED=0
saves none with memories; beyond $EXTENDED_MIND_PREPARED_KEEP cache files (4; 0 keeps none) the least recently
used are deleted. Both are checked like a memory's own files (memory/mapped.py).

The relevance calibration of a memory (what 48 unrelated questions draw from each block, engine/calibration.py) is
144 selection passes over the whole memory, 16 s on one thread at 270k tokens, that every process would otherwise
repeat on its first question. It is two floats per block, keyed by the documents (`Memory.content_key`), the model,
the setting and the calibration prompts' token ids: held by the memory (`Memory.calibrations`, saved in its manifest,
so a memory built by `extended-mind memorize` opens calibrated anywhere) and, for large saved memories, kept beside
the prepared keys in `<cache>/prepared/calibrations/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from extended_mind.base.errors import MemoryFileError
from extended_mind.base.paths import cache_dir
from extended_mind.engine.blocks import Relevance
from extended_mind.memory.derived import DerivedTensors
from extended_mind.memory.files import CheckedTensors
from extended_mind.memory.mapped import (
    MappedFileError,
    advise_random,
    map_safetensors,
    matches,
    remember_checked,
    write_atomic,
    write_safetensors,
)
from extended_mind.memory.memory import Memory
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.scan import PACKED_KINDS, KeyScan
from extended_mind.retrieval.scan_select import with_measured_kernels

log = logging.getLogger(__name__)


PERSIST_MIN = 262_144  # smaller memories prepare in a few seconds


KEEP_ENV = "EXTENDED_MIND_PREPARED_KEEP"  # prepared files kept (least recently used deleted first); 0: none


SAVE_ENV = "EXTENDED_MIND_SAVE_PREPARED"  # 0: a save does not write the prepared keys with the memory


FORMAT = "extended-mind-prepared-1"


_SCAN_TENSORS = ("codes", "scales", "packed", "colsums")  # KeyScan's tensors


def keepable(memory: Memory) -> bool:
    """Whether prepared keys (and the calibration) of `memory` are worth keeping: a large memory whose every
    document is saved (the files' checksums name exactly the keys; an unsaved memory cannot be reopened anyway),
    unless $EXTENDED_MIND_PREPARED_KEEP keeps none."""
    return (memory.num_tokens >= PERSIST_MIN and all(s.file is not None for s in memory.segments)
            and keep_count() > 0)  # fmt: skip


def prepared_key(memory: Memory, policy: str, dtype: torch.dtype, layers: list[int], scan_kind: str) -> str:
    """What the prepared keys depend on: the documents (`Memory.content_key`), the model, the policy and the scan."""
    if scan_kind in PACKED_KINDS:  # the compiled kernels share one packing (either may scan it, scan.KeyScan.kernel)
        scan_kind = "int8-packed"
    parts = [FORMAT, memory.content_key(), memory.identity.to_dict(), policy, str(dtype), layers, scan_kind,
             torch.__version__]  # fmt: skip
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir() / "prepared" / f"{key}.safetensors"


def _layers(tensors: Mapping[str, torch.Tensor], meta: dict, positions: torch.Tensor) -> dict[int, LayerMemory]:
    """Prepared layers from their saved tensors and `meta` (per layer: the scan's key count and packing)."""
    out = {}
    for layer_s, info in meta["layers"].items():
        layer = int(layer_s)
        scan = with_measured_kernels(KeyScan(**{f: tensors.get(f"{layer}.scan.{f}") for f in _SCAN_TENSORS},
                                             num_keys=info["num_keys"], packed_kind=info["packed_kind"]))  # fmt: skip
        keys, values, inv_norms = (tensors[f"{layer}.{n}"] for n in ("keys", "values", "inv_norms"))
        for gathered in (keys, inv_norms):  # read at candidate rows only (search.py): no readahead
            advise_random(gathered)
        out[layer] = LayerMemory(keys=keys, values=values, inv_norms=inv_norms, scan=scan, positions=positions)
    return out


def load(key: str, positions: torch.Tensor, memory: Memory) -> dict[int, LayerMemory] | None:
    """The prepared layers saved under `key` with the memory, else in the cache directory (memory-mapped); None when
    there are none (or they fail their check)."""
    saved = memory.prepared_keys.get(key)
    if saved is not None:
        try:
            tensors = saved.open()
            if isinstance(tensors, CheckedTensors):  # the first question reads them all: hashed together, in parallel
                tensors.check(list(tensors))
            return _layers(tensors, saved.meta, positions)
        except (KeyError, TypeError, ValueError, AttributeError, MemoryFileError, MappedFileError) as exc:
            log.warning("the memory's saved prepared keys are unusable (%s): preparing again", exc)
    if not keepable(memory):
        return None
    path = _path(key)
    try:
        sha = path.with_suffix(".sha256").read_text().strip()
        if not matches(path, sha):
            log.warning("prepared memory %s fails its checksum: preparing again", path)
            return None
        tensors, meta = map_safetensors(path), json.loads(path.with_suffix(".json").read_text())
        out = _layers(tensors, meta, positions)
        _hold(memory, key, meta, tensors)  # a memory saved before prepared keys were saved with it gets them
        os.utime(path.with_suffix(".json"))  # recently used (not the data file: its version is what was checked)
        return out
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, MappedFileError) as exc:
        log.warning("prepared memory %s is unreadable (%s): preparing again", path, exc)
        return None


def store(key: str, prepared: dict[int, LayerMemory], memory: Memory) -> None:
    """Hold prepared layers (each with a scan) on the memory, so that its next save writes them with it
    (memory/derived.py), and keep them in the cache directory for a saved memory (`keepable`); a failure to write
    there only costs preparing again."""
    tensors, meta = {}, {"layers": {}}
    for layer, m in prepared.items():
        tensors |= {f"{layer}.keys": m.keys, f"{layer}.values": m.values, f"{layer}.inv_norms": m.inv_norms}
        tensors |= {f"{layer}.scan.{f}": getattr(m.scan, f) for f in _SCAN_TENSORS if getattr(m.scan, f) is not None}
        meta["layers"][str(layer)] = {"num_keys": m.scan.num_keys, "packed_kind": m.scan.packed_kind}
    _hold(memory, key, meta, tensors)
    if not keepable(memory):
        return
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = write_safetensors(path, tensors)
        path.with_suffix(".json").write_text(json.dumps(meta))
        path.with_suffix(".sha256").write_text(sha)  # written last: without it the file is never used
        remember_checked(path, sha, recent_ok=True)
        _evict(path.parent, keep_count(), (".safetensors", ".json", ".sha256"))
    except OSError as exc:
        log.warning("could not keep the prepared memory in %s: %s", path.parent, exc)


def _hold(memory: Memory, key: str, meta: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Let the memory's next save write these prepared keys with it (unless $EXTENDED_MIND_SAVE_PREPARED=0)."""
    if os.environ.get(SAVE_ENV, "1") != "0":
        memory.prepared_keys.clear()  # the latest setting's only: each is about a fifth of the memory's size
        memory.prepared_keys[key] = DerivedTensors(meta, tensors=tensors)


def keep_count() -> int:
    try:
        return max(0, int(os.environ.get(KEEP_ENV, "4")))
    except ValueError:
        return 4


def _evict(folder: Path, keep: int, suffixes: tuple[str, ...]) -> None:
    """Delete all but the `keep` most recently used entries of `folder` (each a .json file and its `suffixes`)."""
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        for suffix in suffixes:
            old.with_suffix(suffix).unlink(missing_ok=True)


CALIBRATIONS_KEPT = 64  # a few KB each: least recently used deleted beyond this many


def relevance_key(memory: Memory, setting: str, prompts: list[list[int]]) -> str:
    """What a memory's relevance calibration depends on: its documents, the model, the setting and the prompts."""
    parts = [FORMAT, "relevance", memory.content_key(), memory.identity.to_dict(), setting, prompts]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def relevance_to_dict(relevance: Relevance) -> dict:
    return {"mean": relevance.mean.tolist(), "spread": relevance.spread.tolist()}


def relevance_from_dict(data: object, num_blocks: int) -> Relevance:
    """A calibration read back (from the cache or a memory's manifest), checked to fit `num_blocks` blocks."""
    if not isinstance(data, dict):
        raise TypeError("not a calibration")
    mean, spread = torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["spread"], dtype=torch.float32)
    if mean.shape != (num_blocks,) or spread.shape != (num_blocks,):
        raise ValueError("does not fit the memory's blocks")
    if not bool(torch.isfinite(mean).all()) or not bool((spread > 0).all()) or not bool(torch.isfinite(spread).all()):
        raise ValueError("holds values a calibration cannot have")
    return Relevance(mean, spread)


def _relevance_path(key: str) -> Path:
    return cache_dir() / "prepared" / "calibrations" / f"{key}.json"


def load_relevance(key: str, num_blocks: int) -> Relevance | None:
    """The calibration kept under `key`, or None (none kept, or unreadable: calibrated again)."""
    path = _relevance_path(key)
    try:
        found = relevance_from_dict(json.loads(path.read_text()), num_blocks)
        os.utime(path)
        return found
    except FileNotFoundError:
        return None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        log.warning("kept calibration %s is unreadable (%s): calibrating again", path, exc)
        return None


def store_relevance(key: str, relevance: Relevance) -> None:
    """Keep a calibration under `key` (written aside and renamed: a reader never sees half a file)."""
    path = _relevance_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(relevance_to_dict(relevance)).encode()
        write_atomic(path, [data], digest=False)
        _evict(path.parent, CALIBRATIONS_KEPT, (".json",))
    except OSError as exc:
        log.warning("could not keep the calibration in %s: %s", path.parent, exc)
