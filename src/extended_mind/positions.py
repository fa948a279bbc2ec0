"""Position policies: where retrieved memories sit, in rotary terms, relative to the prompt.

- "zero" (the reference): every memory key is rotated as if at position 0; the prompt keeps positions 0, 1, ...
- "stored": every memory key keeps the position it had inside its memorization window, and the prompt's positions
  start right after the largest stored position, so memories read as text just before the prompt.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .attention import LayerMemory
from .index import IndexSettings, LayerIndex, memory_fingerprint
from .memory import Memory
from .rope import apply_rope

POSITION_POLICIES = ("zero", "stored")
# From this many memory tokens, exact search in a float32 model scans a bfloat16 copy of the keys (half the bytes)
# and scores its shortlist in float32: same results, about 2.4x faster at 16k tokens on an AVX512-BF16 CPU.
LOW_PRECISION_SCAN_MIN = 4096


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here: CUDA, or a CPU with AVX512-BF16 / AMX (else they are emulated)."""
    if device.type == "cuda":
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


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
) -> dict[int, LayerMemory]:
    """Rotate memory keys for `policy` (one of POSITION_POLICIES, checked by the caller), move them to the model's
    device, and with `index` attach approximate-search indexes (loaded when saved with the memory, else built);
    cached on the memory per setting."""
    cache_key = (policy, str(device), dtype, index)
    prepared = memory._prepared.get(cache_key)
    if prepared is None:
        memory._prepared.clear()  # one prepared copy at a time: memory use stays at most about twice the memory
        prepared = {}
        scan_in_bfloat16 = (
            index is None and memory.num_tokens >= LOW_PRECISION_SCAN_MIN and dtype == torch.float32
            and fast_bfloat16(device)
        )  # fmt: skip
        for layer in range(memory.num_layers):
            table = memory.layer_rope[layer]
            cos, sin = memory.rope_cos[table], memory.rope_sin[table]
            pos = torch.zeros_like(memory.positions) if policy == "zero" else memory.positions
            pos = pos.long()
            keys = apply_rope(memory.layer_keys(layer).float(), cos[pos], sin[pos])
            keys = keys.to(device=device, dtype=dtype)
            prepared[layer] = LayerMemory(
                keys=keys,
                values=memory.layer_values(layer).to(device=device, dtype=dtype),
                inv_norms=1.0 / keys.float().norm(dim=-1).clamp_min(1e-12).to(dtype),
                scan_keys=keys.to(torch.bfloat16) if scan_in_bfloat16 else None,
            )
        if index is not None:
            for layer, layer_index in enumerate(memory_indexes(memory, policy, index, prepared)):
                prepared[layer].index, prepared[layer].index_settings = layer_index, index
        memory._prepared[cache_key] = prepared
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
        found = found()
    if found is None:
        layers = range(memory.num_layers)
        show = memory.num_tokens >= 65_536
        found = [LayerIndex.build(prepared[layer].keys, settings) for layer in tqdm(
            layers, desc="building search index", unit="layer", disable=not show)]  # fmt: skip
    memory.indexes = {fingerprint: found}  # one set at a time: indexes are about as large as the keys
    return found
