"""A memory sharded over the ranks of a process group: who holds which document, and saving it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from extended_mind.memory.files import StoredFile, store_segment
from extended_mind.memory.store import TENSOR_DIR, check_save_target, save_memory
from extended_mind.parallel.group import ShardError, ShardGroup

if TYPE_CHECKING:  # the memory imports this module to save itself sharded
    from extended_mind.memory.memory import Memory


def least_loaded(loads: list[int]) -> int:
    return min(range(len(loads)), key=lambda r: (loads[r], r))


def rank_loads(memory: Memory, world: int) -> list[int]:
    loads = [0] * world
    for s in memory.segments:
        if s.rank is not None:
            loads[s.rank] += s.num_tokens
    return loads


def shard_memory(memory: Memory, group: ShardGroup) -> Memory:
    """Shard `memory` over `group` in place (same call on every rank): documents without a rank go to the least
    loaded rank, each rank reads (and checksums) only its documents' tensor files, and the ranks exchange the
    positions and spans of their documents. Returns the memory."""
    if memory.shard is group and all(s.rank is not None for s in memory.segments):
        return memory
    if memory.shard is not None and memory.shard is not group:
        raise ShardError("this memory is sharded over another process group")
    loads = rank_loads(memory, group.world)
    for s in memory.segments:
        if s.rank is None:
            s.rank = least_loaded(loads)
            loads[s.rank] += s.num_tokens
    mine = [i for i, s in enumerate(memory.segments) if s.rank == group.rank and not s.remote]

    def read_mine() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: (memory.segments[i].tensors["positions"], memory.segments[i].tensors["spans"]) for i in mine}

    parts = group.everywhere(read_mine, "opening the memory's documents")
    for rank_part in parts:
        for i, (positions, spans) in rank_part.items():
            s = memory.segments[i]
            if s.rank != group.rank:  # keep only what positions and citations need
                s.hold_positions_only(positions, spans)
    memory.shard = group
    memory.changed()
    return memory


def save_sharded(memory: Memory, path: Path) -> Path:
    """`Memory.save` for a sharded memory: each rank writes its documents' tensor files, rank 0 the manifest."""

    group: ShardGroup = memory.shard
    path = Path(path)

    def check_target() -> None:
        if group.rank == 0:
            check_save_target(path)
            (path / TENSOR_DIR).mkdir(parents=True, exist_ok=True)

    def write_mine() -> dict[int, StoredFile]:
        return {i: store_segment(s, path / TENSOR_DIR) for i, s in enumerate(memory.segments) if not s.remote}

    group.everywhere(check_target, "checking where to save the memory")
    files = group.everywhere(write_mine, "saving the memory")
    for part in files:
        for i, f in part.items():
            memory.segments[i].file = f

    def write_manifest() -> str | None:
        if group.rank != 0:
            return None
        unseen = [s.document.id for s in memory.segments if s.file is None or not s.file.path.is_file()]
        if unseen:  # never write a manifest naming files this rank cannot see
            raise ShardError(
                f"rank 0 cannot see the tensor files of documents {unseen[:5]} written by other ranks: a sharded "
                f"memory is saved to a directory all ranks share ({path})"
            )
        return str(save_memory(memory, path, checked=True))

    return Path(group.everywhere(write_manifest, "writing the manifest")[0])
