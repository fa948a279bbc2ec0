"""One decode row reading block memory's slots, in as few tensor operations as the softmax allows.

Every step of an answer that reads memory runs this in every layer, and at one query row the cost is the number
of operations, not their size: the general path (function.py `_attend`, which also serves prompts, token
retrieval, ALiBi, soft-capping and sliding windows) spent 0.26 ms per layer, 7 ms of a 28 ms step on SmolLM2. Same
arithmetic, operation for operation, as that path: one softmax over the slots and the local keys, the slots first.
On a CPU with the compiled kernel (kernels/slot_attend.cpp) the same step runs fused, reading each slot key and
value once, the slots cut in chunks that torch's threads share: on SmolLM2's 8 blocks 0.11 ms per layer against
0.19 at one thread, 0.07 against 0.19 at two; used where a timing here says it is not slower.
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache
from types import ModuleType

import torch

from extended_mind.attention.session import Session
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.native import slot_kernel

_GENERAL_ONLY = ("softcap", "alibi", "local_bias")  # extras only the general path applies

Record = tuple[torch.Tensor, torch.Tensor]  # a citation record: (memory token indices, weights)
_NONE = torch.empty(0)  # the kernel's "no mask" and "no citation weights"


def plain_slot_step(module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None,
                    mem: LayerMemory, positions: torch.Tensor | None, session: Session,
                    kwargs: dict) -> bool:  # fmt: skip
    """Whether this call is one decode row that reads every slot with nothing else to apply: no sliding window, no
    bias or soft-capping, a boolean (or no) mask, and the row placed after the slots."""
    if mem.slot_tokens is None or query.shape[2] != 1 or getattr(module, "sliding_window", None):
        return False
    if any(kwargs.get(x) is not None for x in _GENERAL_ONLY):
        return False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return False
    if positions is not None and mem.slot_end > 0:  # a decode row comes after the slots: checked where it is free
        if positions.device.type != "cpu" or session.first_position(positions) < mem.slot_end:
            return False
    return True


def attend_slot_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, mem: LayerMemory, scaling: float,
                     weighting: str | None) -> tuple[torch.Tensor, Record | None]:  # fmt: skip
    """query (B, Hq, 1, D), key/value (B, H, Skv, D), slots mem.keys/values (H, S, D) -> the output (B, 1, Hq, D)
    and, when `weighting` is given ("attention" or "attention_value"), the citation record of the first row:
    (slot tokens, their weights summed over heads), as function.py `_citation_record`."""
    if _fusable(query, key, value, mem) and (kernel := fused_kernel()) is not None:
        hq, d = query.shape[1], query.shape[3]
        mask = _NONE if attention_mask is None else attention_mask[0, 0, -1, -key.shape[2] :].contiguous()
        out, cite = kernel.slot_attend(query.reshape(hq, d).contiguous(), key[0], value[0], mask, mem.keys,
                                       mem.values, citation_weights(mem, weighting), scaling,
                                       weighting is not None)  # fmt: skip
        return out.view(1, 1, hq, d), (mem.slot_tokens, cite) if weighting is not None else None
    return _torch_step(query, key, value, attention_mask, mem, scaling, weighting)


def _torch_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                mem: LayerMemory, scaling: float, weighting: str | None) -> tuple[torch.Tensor, Record | None]:
    b, hq, _, d = query.shape
    h, skv, s = key.shape[1], key.shape[2], mem.keys.shape[1]
    qg = query.reshape(b, h, hq // h, d)  # query head h*g + j -> kv head h (as repeat_kv)
    local = torch.matmul(qg, key.transpose(-1, -2)).float()
    if attention_mask is not None:
        local = local.masked_fill(~attention_mask[:, :, -1:, -skv:], float("-inf"))  # (B, 1, 1, Skv) over heads
    slots = torch.matmul(qg.to(mem.keys.dtype), mem.keys.transpose(1, 2)).float()
    probs = torch.softmax(torch.cat([slots * scaling, local * scaling], dim=-1), dim=-1)  # (B, H, g, S + Skv)
    p_slots = probs[..., :s]
    out = torch.matmul(probs[..., s:].to(value.dtype), value)
    out = out + torch.matmul(p_slots.to(mem.values.dtype), mem.values).to(out.dtype)
    record = slot_citation(mem, p_slots[0], weighting) if weighting is not None else None
    return out.reshape(b, 1, hq, d), record


def slot_citation(mem: LayerMemory, p: torch.Tensor, weighting: str) -> Record:
    """The citation record of one query row reading slots, p (H, g, S) its probabilities: (slot tokens, weights
    summed over heads), each p weighed by the slot's |v| under "attention_value" (see function.py
    `_citation_record`)."""
    if weighting == "attention_value":
        p = p * _value_norms(mem).unsqueeze(1)
    return mem.slot_tokens, p.sum(dim=(0, 1)).detach()


def _value_norms(mem: LayerMemory) -> torch.Tensor:
    """(H, S) |v| of the slots: what "attention_value" citations weigh each probability by."""
    return mem.value_norms if mem.value_norms is not None else mem.values.float().norm(dim=-1)


def citation_weights(mem: LayerMemory, weighting: str | None) -> torch.Tensor:
    """What the kernel weighs a slot's probability by in citations: |v| under "attention_value", else nothing."""
    return _value_norms(mem).float().contiguous() if weighting == "attention_value" else _NONE


def _fusable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mem: LayerMemory) -> bool:
    """One row of one sequence on the CPU, float32 throughout, in the layouts the kernel reads (the mask is boolean
    or None: `plain_slot_step` let only those through)."""
    if query.shape[0] != 1 or key.stride(-1) != 1 or key.stride() != value.stride() or not fusable_slots(mem):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value))


def fusable_slots(mem: LayerMemory) -> bool:
    """Slots the kernel reads: keys and values float32 and contiguous on the CPU."""
    tensors = (mem.keys, mem.values)
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


@lru_cache(maxsize=1)
def fused_kernel() -> ModuleType | None:
    """The compiled slot attention where it is built and not slower here than the torch operations, timed once per
    process on a SmolLM2-sized layer (9 query heads on 3, 512 slots, 64 dimensions)."""
    kernel = slot_kernel()
    if kernel is None:
        return None
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, h, n, 64, generator=gen) for h, n in ((9, 1), (3, 64), (3, 64)))
    slots = LayerMemory(keys=torch.randn(3, 512, 64, generator=gen), values=torch.randn(3, 512, 64, generator=gen),
                        inv_norms=torch.ones(3, 512), slot_tokens=torch.arange(512))  # fmt: skip

    def fused() -> None:
        kernel.slot_attend(query[0, :, 0], key[0], value[0], _NONE, slots.keys, slots.values, _NONE, 0.125, True)

    def plain() -> None:
        _torch_step(query, key, value, None, slots, 0.125, "attention")

    times = {}
    for name, step in (("fused", fused), ("plain", plain)) * 2:
        runs = []
        for _ in range(15):
            start = time.perf_counter()
            step()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    return kernel if times["fused"] <= times["plain"] else None
