"""Position policies: where retrieved memories sit, in rotary terms, relative to the prompt.

- "zero" (the reference): every memory key is rotated as if at position 0; the prompt keeps positions 0, 1, ...
- "stored": every memory key keeps the position it had inside its memorization window, and the prompt's positions
  start right after the largest stored position, so memories read as text just before the prompt.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from extended_mind.base.rope import apply_rope
from extended_mind.engine import prepared as prepared_store
from extended_mind.memory.memory import Memory
from extended_mind.parallel.group import LayerShard
from extended_mind.retrieval.index import IndexSettings, LayerIndex, memory_fingerprint
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.scan_select import build_scan, scan_path

POSITION_POLICIES = ("zero", "stored")


# From this many memory tokens, exact search shortlists with a compact copy of the keys (scan.py): same results,
# fewer bytes read per query.
LOW_PRECISION_SCAN_MIN = 4096


def prompt_offset(memory: Memory | None, policy: str) -> int:
    """First position id of the prompt under `policy`."""
    if memory is None or policy == "zero" or memory.num_tokens == 0:
        return 0
    return int(memory.positions.max()) + 1


def prepare_layers(
    memory: Memory,
    policy: str,
    device: torch.device,
    dtype: torch.dtype,
    layers: list[int] | None,
    index: IndexSettings | None = None,
    scan_from: int | None = None,
    values: bool = True,
) -> dict[int, LayerMemory]:
    """Rotate memory keys for `policy` (one of POSITION_POLICIES, checked by the caller), move them to the model's
    device, and with `index` attach approximate-search indexes (loaded when saved with the memory, else built);
    cached on the memory per setting. A sharded memory prepares the tokens this rank holds (parallel/group.py).
    `scan_from`: the memory size from which exact search scans a compact copy (default: this memory's).
    `values=False` (block selection, which only ranks keys): no values, and keys that a compact copy shortlists stay
    in their stored precision (bfloat16: half the bytes of float32; the few shortlisted rows are scored upcast, so
    the scores are the same as from a float32 copy)."""
    if memory.shard is not None:
        return _prepare_sharded(memory, policy, device, dtype, layers, index, values)
    # only the layers asked for (block memory prepares its selection layers alone); indexes cover every layer
    wanted = range(memory.num_layers) if layers is None or index is not None else sorted(set(layers))
    cache_key = (policy, str(device), dtype, index, tuple(wanted), values)
    prepared = memory.prepared_layers.get(cache_key)
    if prepared is None:
        memory.prepared_layers.clear()  # one prepared copy at a time: memory use stays at most about twice the memory
        scanned = index is None and (memory.num_tokens if scan_from is None else scan_from) >= LOW_PRECISION_SCAN_MIN
        # (under "zero" the stored positions are not read: a cold million-token memory reads them from 246 files)
        pos = torch.zeros(memory.num_tokens, dtype=torch.long) if policy == "zero" else memory.positions.long()
        # ALiBi (alibi.py) biases a memory by its position: under "zero", one before the prompt (the reference's
        # ALiBi rule); under "stored", the position it rotates to here
        bias_positions = torch.full_like(pos, -1) if policy == "zero" else pos
        # block selection over a large memory: saved with it, and kept in the cache directory (engine/prepared.py)
        keep = not values and scanned and device.type == "cpu" and memory.num_tokens >= prepared_store.PERSIST_MIN
        key = prepared_store.prepared_key(memory, policy, dtype, list(wanted), scan_path()) if keep else None
        found = prepared_store.load(key, bias_positions, memory) if key else None
        prepared = found or {}
        if set(prepared) != set(wanted):
            prepared = _prepare(memory, policy, device, dtype, wanted, pos, bias_positions, scanned, values)
            if key and all(m.scan is not None for m in prepared.values()):
                prepared_store.store(key, prepared, memory)
        if index is not None:
            for layer, layer_index in enumerate(memory_indexes(memory, policy, index, prepared)):
                layer_index = layer_index.to(device)
                prepared[layer].index, prepared[layer].index_settings = layer_index, index
                prepared[layer].scan = layer_index.scan_of(prepared[layer].keys)
        memory.prepared_layers[cache_key] = prepared
    if layers is None:
        return dict(prepared)
    return {layer: prepared[layer] for layer in layers}


def _prepare(
    memory: Memory,
    policy: str,
    device: torch.device,
    dtype: torch.dtype,
    wanted: range | list[int],
    pos: torch.Tensor,
    bias_positions: torch.Tensor,
    scanned: bool,
    values: bool,
) -> dict[int, LayerMemory]:
    """`prepare_layers` for one setting, computed."""
    # the tensors read below, hashed on several threads first (files with per-tensor checksums: only these)
    kinds = ("keys", "key_scales", "values", "value_scales") if values else ("keys", "key_scales")
    memory.open_all(check=[f"{kind}.{layer}" for layer in wanted for kind in kinds] + ["positions", "spans"])
    prepared = {}
    for layer in tqdm(wanted, desc="preparing memory", unit="layer", disable=memory.num_tokens < (1 << 19)):
        table = memory.rope.layer_rope[layer]
        cos, sin = memory.rope.cos[table], memory.rope.sin[table]
        keys = memory.layer_keys(layer).to(device)  # rotated where the model runs (a GPU rotates 1M keys at once)
        if not (policy == "zero" and bool((cos[0] == 1).all()) and bool((sin[0] == 0).all())):
            at = pos.to(device)  # (at position 0 the rotation is the identity)
            keys = apply_rope(keys.float(), cos.to(device)[at], sin.to(device)[at])
        keep_stored = not values and scanned and keys.dtype != dtype and keys.dtype.itemsize < dtype.itemsize
        keys = keys.to(device=device, dtype=keys.dtype if keep_stored else dtype)
        scan = build_scan(keys) if scanned else None
        if keep_stored and scan is None:  # the keys themselves are scanned: in the model's dtype
            keys = keys.to(dtype)
        h, _, dv = memory.rope.kv_shapes[layer]
        prepared[layer] = LayerMemory(
            keys=keys,
            values=memory.layer_values(layer).to(device=device, dtype=dtype)
            if values
            else torch.empty(h, 0, dv, device=device, dtype=dtype),
            inv_norms=1.0 / keys.float().norm(dim=-1).clamp_min(1e-12).to(dtype),
            scan=scan,
            positions=bias_positions,
        )
    return prepared


def _prepare_sharded(
    memory: Memory,
    policy: str,
    device: torch.device,
    dtype: torch.dtype,
    layers: list[int] | None,
    index: IndexSettings | None,
    values: bool = True,
) -> dict[int, LayerMemory]:
    """The local documents prepared as usual (the same search path as the whole memory would take; a rank with no
    documents has no index), with global indices: their global token numbers and every memory's position."""

    cache_key = ("sharded", policy, str(device), dtype, index, None if layers is None else tuple(sorted(set(layers))),
                 values)  # fmt: skip
    prepared = memory.prepared_layers.get(cache_key)
    if prepared is None:
        memory.prepared_layers.clear()
        local = memory.local_view()
        local_index = index if local.num_tokens else None
        scan_from = memory.num_tokens if local.num_tokens else 0  # nothing to scan here
        local_layers = prepare_layers(local, policy, device, dtype, layers, local_index, scan_from, values)
        shard = LayerShard(memory.shard, memory.local_to_global().to(device), memory.num_tokens)
        # (ALiBi's positions: under "zero" all one before the prompt, the stored ones not read, as above)
        n = memory.num_tokens
        positions = torch.full((n,), -1, dtype=torch.long) if policy == "zero" else memory.positions.long()
        prepared = {i: replace(m, shard=shard, positions=positions) for i, m in local_layers.items()}
        memory.prepared_layers[cache_key] = prepared
    if layers is None:
        return dict(prepared)
    return {layer: prepared[layer] for layer in layers}


def memory_indexes(
    memory: Memory, policy: str, settings: IndexSettings, prepared: dict[int, LayerMemory]
) -> list[LayerIndex]:
    """Per-layer indexes of the prepared keys: the ones saved with (or built earlier for) the same documents,
    policy and settings, else built now (with a progress bar for large memories)."""
    fingerprint = memory_fingerprint(memory.content_key(), policy, settings.key(memory.num_tokens))
    found = memory.indexes.get(fingerprint)
    if callable(found):  # saved with the memory: read (and checksum) it now
        found = found(memory.num_tokens)
    if found is None:
        layers = range(memory.num_layers)
        show = memory.num_tokens >= 65_536
        found = [LayerIndex.build(prepared[layer].keys, settings) for layer in tqdm(
            layers, desc="building search index", unit="layer", disable=not show)]  # fmt: skip
    memory.indexes = {fingerprint: found}  # one set at a time: indexes are about as large as the keys
    return found
