"""A memory sharded over processes with torch.distributed: exact results, each rank holding part of the documents.

SPMD: every rank runs the same model on the same prompt; the memory's documents are split across ranks (each whole
document on one rank, assigned to the least loaded). Every rank knows every document (its text, token count,
positions and character spans: about 12 bytes a token) but holds keys and values only for its own.

Where attention reads memory, each rank finds its local top-k (the raw q.k scores, the cosine norms and the values
of its best keys), the ranks exchange them in one all_gather per layer, and every rank merges them into the global
top-k with the same ranking, mask and order as one process would use: the joint softmax, the output and the
citations are those of the unsharded memory. Block memory gathers the chosen blocks' keys and values the same way
(once per question), and its block scores come from the merged top-k. The sampled token (and the uncertainty
decision) is taken from rank 0 so ranks never diverge.

Collectives have a timeout (EXTENDED_MIND_DIST_TIMEOUT seconds, default 300) and every failure becomes a
`ShardError` naming the rank and the cause; a rank that fails to read its documents (a checksum, a missing file)
tells the others before anyone waits on it. Saving writes the unsharded format: each rank writes its documents'
tensor files, then rank 0 writes the manifest (the ranks must share the memory directory's file system).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from extended_mind.base.errors import ExtendedMindError

T = TypeVar("T")


DEFAULT_TIMEOUT_S = 300.0


class ShardError(ExtendedMindError):
    """A rank of a sharded memory failed, stopped, or did not answer in time."""


def _timeout() -> timedelta:
    raw = os.environ.get("EXTENDED_MIND_DIST_TIMEOUT")
    try:
        return timedelta(seconds=float(raw) if raw else DEFAULT_TIMEOUT_S)
    except ValueError:
        raise ExtendedMindError(f"EXTENDED_MIND_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or the like) as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> ShardGroup | None:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL with CUDA), with the
    collective timeout; None when this is a single process."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched_distributed():
            return None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=_timeout())
        except (RuntimeError, ValueError) as exc:
            raise ShardError(f"could not join the process group ({backend}): {exc}") from None
    return active_group()


def active_group() -> ShardGroup | None:
    """The group of an initialised process group of more than one rank, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    global _GROUP
    if _GROUP is None:
        _GROUP = ShardGroup()
    return _GROUP


_GROUP: ShardGroup | None = None


class ShardGroup:
    """The ranks of the default process group, with collectives that fail with a clear error instead of hanging
    or raising from deep inside torch. Counts the bytes this rank sends, the collectives and the time spent in them."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        self.bytes_sent = 0
        self.collectives = 0
        self.seconds = 0.0  # spent in collectives (waiting for the other ranks included)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        self.collectives += 1
        start = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            # gloo reports a dead peer as a closed connection and a silent one as a timeout
            raise ShardError(
                f"sharded memory: {what} failed on rank {self.rank} of {self.world}: another rank stopped or did not "
                f"answer within {_timeout().total_seconds():g} s ({str(exc).splitlines()[0] if str(exc) else exc!r})"
            ) from None
        finally:
            self.seconds += time.perf_counter() - start

    def _to_comm(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device) if self.device is not None else x.cpu()

    def all_gather(self, x: torch.Tensor, what: str = "exchange") -> list[torch.Tensor]:
        """x from every rank (same shape and dtype everywhere), on x's device."""
        send = self._to_comm(x.contiguous())
        out = [torch.empty_like(send) for _ in range(self.world)]
        self.bytes_sent += send.numel() * send.element_size()
        self._run(what, lambda: dist.all_gather(out, send))
        return [o.to(x.device) for o in out]

    def all_reduce_sum(self, x: torch.Tensor, what: str = "exchange") -> torch.Tensor:
        send = self._to_comm(x.contiguous()).clone()
        self.bytes_sent += send.numel() * send.element_size()
        self._run(what, lambda: dist.all_reduce(send))
        return send.to(x.device)

    def all_gather_object(self, obj: Any, what: str = "exchange") -> list[Any]:
        out: list[Any] = [None] * self.world
        self._run(what, lambda: dist.all_gather_object(out, obj))
        return out

    def agree(self, values: list[int], what: str = "agreeing on the next token") -> list[int]:
        """Rank 0's `values` on every rank (the same length everywhere)."""
        t = self._to_comm(torch.tensor(values, dtype=torch.long))
        self.bytes_sent += t.numel() * 8
        self._run(what, lambda: dist.broadcast(t, src=0))
        return t.cpu().tolist()

    def fetch_sum(self, tensors: list[torch.Tensor], what: str = "gathering memory blocks") -> list[torch.Tensor]:
        """Tensors each rank filled where it holds the rows (zeros elsewhere), summed over the ranks in one
        all_reduce. Every row is held by exactly one rank, so even the bytes add up exactly: the sum runs on the
        packed bytes, whatever the dtypes."""
        summed = self.all_reduce_sum(pack(tensors), what)
        return unpack(summed, [(t.shape, t.dtype) for t in tensors])

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        self._run(what, lambda: dist.barrier())

    def everywhere(self, fn: Callable[[], T], what: str) -> list[T]:
        """Run fn on every rank and return every rank's result; if it fails on any rank, every rank raises a
        ShardError naming the ranks and their errors (so no rank is left waiting on one that gave up)."""
        failure: Exception | None = None
        try:
            result, error = fn(), None
        except Exception as exc:  # told to the others before raising here, whatever it is
            failure, result, error = exc, None, f"{type(exc).__name__}: {exc}"
        gathered = self.all_gather_object((error, result), what)
        errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e is not None]
        if errors:
            raise ShardError(f"sharded memory: {what} failed: " + "; ".join(errors)) from failure
        return [r for _, r in gathered]


def pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors as one flat byte tensor (one collective instead of one per tensor)."""
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


def unpack(buf: torch.Tensor, like: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    out, at = [], 0
    for shape, dtype in like:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        out.append(buf[at : at + n].view(dtype).view(shape))
        at += n
    return out


class LayerShard:
    """What a layer's attention needs to merge its local top-k with the other ranks': the group, the global index
    of every local memory token, and the number of memory tokens over all ranks."""

    def __init__(self, group: ShardGroup, local_to_global: torch.Tensor, total: int):
        self.group, self.local_to_global, self.total = group, local_to_global, total
