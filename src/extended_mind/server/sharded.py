"""Serving a sharded memory (under torchrun): rank 0 runs the HTTP server, the other ranks follow its model thread.

Every rank must run the same forward passes in the same order, because each memory layer exchanges its top-k
with the others. Rank 0's model thread therefore announces, before it does them, the few things it does with the
model: open a request's token stream (prompt, memory names, options), start a batch, let rows join it, take a
decode step, take one step of a stream that runs alone, drop a stream. The followers do the same with their own
model and shards. Tokens, and a client that went away, are agreed inside the steps (generation.py, batching.py).

Announcements travel on a process group of their own whose timeout is long (an idle server is not an error),
while the exchanges inside the steps keep the short one, so a rank that dies is still reported at once.
Memories are opened at start, on every rank in the same order; while sharded they are read-only through the
server (edit them with the CLI or the Python API, then restart).
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from extended_mind.engine.batching import BatchRow, DecodeBatch
from extended_mind.engine.mind import ExtendedMind
from extended_mind.parallel.group import ShardError, ShardGroup
from extended_mind.server.config import ServerConfig
from extended_mind.server.library import MemoryLibrary

log = logging.getLogger(__name__)
_IDLE = timedelta(days=365)


class Mirror:
    """Rank 0's side: announces each model-thread action to the followers."""

    def __init__(self, group: ShardGroup):
        self.group = group
        self.control = _control_group()
        self._ids = itertools.count()

    def new_id(self) -> int:
        return next(self._ids)

    def send(self, op: str, *args: Any) -> None:
        box = [(op, args)]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ShardError(f"sharded server: a follower rank is gone ({str(exc).splitlines()[0]})") from None


def _control_group():
    return dist.new_group(backend="gloo", timeout=_IDLE)


def open_memories(library: MemoryLibrary) -> None:
    """Open every saved memory now, in name order (the same on every rank: opening shards it, an exchange)."""
    for name in library.names():
        library.get(name)
    library.read_only = True


def follow(mind: ExtendedMind, config: ServerConfig) -> None:
    """A follower rank: do what rank 0's model thread announces until it stops."""
    group = mind.shard_group
    if group is None:
        raise ShardError("follow() needs a process group of more than one rank")
    control = _control_group()
    library = MemoryLibrary(config.memory_dir, mind)
    open_memories(library)
    streams: dict[int, Any] = {}
    batch = DecodeBatch(mind.model, mind.tokenizer, config.max_batch, config.prefill_chunk)
    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=control)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ShardError(f"sharded server: rank 0 is gone ({str(exc).splitlines()[0]})") from None
        op, args = box[0]
        if op == "stop":
            return
        try:
            if op == "stream":
                rid, prompt, names, options = args
                streams[rid] = mind.stream(prompt, memory=library.memory_for(names), **options)
            elif op == "batch":
                batch = DecodeBatch(mind.model, mind.tokenizer, config.max_batch, config.prefill_chunk)
            elif op == "join":
                joining = []
                for rid in args[0]:
                    s = streams.pop(rid)
                    joining.append((BatchRow.of(s), s.settings, lambda item: None, lambda: False))
                batch.join_many(joining)
            elif op == "step":
                batch.step()
            elif op == "next":
                next(streams[args[0]], None)
            elif op == "drop":
                streams.pop(args[0], None)
        except ShardError:
            raise
        except Exception as exc:  # rank 0 met the same error and answers its client with it
            log.debug("follower rank %d: %s failed: %s", group.rank, op, exc)
