"""Approximate top-k for large memories: an IVF index per layer and KV head whose probed cells are scanned in a
compact copy of the keys (retrieval/scan.py), with the shortlist re-scored exactly.

Attention keys defeat graph indexes (HNSW recall 0.05-0.79 in ../shared/DESIGN.md) but cluster well enough for
IVF. Keys are split into `nlist` k-means cells (trained with faiss on the centred keys, so that the cells split the
keys by what differs between them rather than by their large shared part) and stored grouped by cell. A query
ranks the cells by q . centroid and probes the best `nprobe`; the queries of one KV head in one call (the grouped
query heads of a decoded token, or a block of prompt tokens) scan the union of their cells in the compact copy:
the compiled int8 kernel (native.py) scans the cells' contiguous ranges in place; otherwise their keys are gathered
and scanned with one matrix multiply (plain torch, so it runs wherever the model runs, CUDA too). The scan only
shortlists: the shortlisted keys are scored exactly (q . k, in the model's dtype), so approximation can only miss a
key, never misorder or misscore the ones it returns.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from extended_mind.base.errors import ExtendedMindError
from extended_mind.retrieval.exact import SCORE_BLOCK, exact_scores
from extended_mind.retrieval.scan import KeyScan, fast_topk, shortlist_size
from extended_mind.retrieval.scan_select import build_scan

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; this names the problem if it is missing
    faiss = None


# Memory tokens from which "auto" search is approximate. On the CPU measured (docs/speed.md) the int8 exact scan beat
# the IVF path at every size up to 262,144 tokens, so auto stays exact well past that.
DEFAULT_APPROX_THRESHOLD = 1_048_576


# A head's queries whose probed cells cover more than this share of the keys scan all of them, in place: cheaper
# than gathering the cells' keys first.
_FULL_SCAN_SHARE = 0.6


@dataclass(frozen=True)
class IndexSettings:
    """How approximate search is built and queried."""

    nlist: int | None = None  # k-means cells per (layer, KV head); None: about 4 sqrt(N), at most 4096
    nprobe: int | None = None  # cells scanned per query; None: a fifth of the cells (see `probes`)
    candidates: int = 3  # keys scored exactly per retrieved key (at least the exact scan's shortlist, scan.py)
    train_points_per_cell: int = 48  # k-means training sample size per cell (faiss needs >= 39)
    seed: int = 0

    def cells(self, n: int) -> int:
        nlist = self.nlist if self.nlist is not None else int(4 * math.sqrt(n))
        return max(1, min(nlist, 4096, n // 39))  # every cell needs enough training points

    def probes(self, nlist: int) -> int:
        # Later SmolLM2 layers attend diffusely: their top-10 keys spread over many cells. Recall@10 on a
        # 28k-token memory with 669 cells (a development probe, one query at a time): 0.79 at 16 probes, 0.87 at
        # 32, 0.92 at 64, 0.96 at 128.
        return min(nlist, self.nprobe if self.nprobe is not None else max(1, math.ceil(nlist / 5)))

    def shortlist(self, k: int, n: int) -> int:
        return min(n, max(self.candidates * k, shortlist_size(k, n)))

    def key(self, n: int) -> str:
        return f"ivf-sorted-{self.cells(n)}-seed{self.seed}"


def require_faiss() -> None:
    if faiss is None:
        raise ExtendedMindError("building a search index needs the faiss-cpu package: pip install faiss-cpu")


@dataclass
class LayerIndex:
    """IVF cells of one layer's keys (H KV heads, N keys, C cells, D dims), as attention sees the keys (rotated for
    the position policy):
      centroids (H, C, D): cell centres of the centred keys (probing ranks cells by q . centroid);
      order (H, N): the keys grouped by cell: order[h, i] is the memory index of the i-th key in cell order;
      offsets (H, C + 1): cell c holds order[h, offsets[h, c] : offsets[h, c + 1]]."""

    centroids: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def build(cls, keys: torch.Tensor, settings: IndexSettings) -> LayerIndex:
        require_faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())
        h, n, d = keys.shape
        nlist = settings.cells(n)
        rng = np.random.default_rng(settings.seed)
        centroids, orders, offsets = [], [], []
        for x in keys:
            data = x.detach().float()
            data = data - data.mean(0, keepdim=True)
            sample = min(n, nlist * settings.train_points_per_cell)
            rows = torch.from_numpy(rng.choice(n, sample, replace=False)) if sample < n else None
            train = data[rows] if rows is not None else data
            kmeans = faiss.Kmeans(d, nlist, niter=10, seed=settings.seed, spherical=False, verbose=False)
            kmeans.train(np.ascontiguousarray(train.cpu().numpy()))
            centres = torch.from_numpy(kmeans.centroids).to(data.device)
            cell = _assign(data, centres)  # each key to its best cell by inner product, as it will be probed
            order = torch.argsort(cell, stable=True)
            counts = torch.bincount(cell, minlength=nlist)
            centroids.append(centres)
            orders.append(order)
            offsets.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        return cls(torch.stack(centroids), torch.stack(orders), torch.stack(offsets))

    def scan_of(self, keys: torch.Tensor) -> KeyScan:
        """The compact scan copy of keys (H, N, D), in cell order: a probed cell is a contiguous range of it."""
        grouped = keys.gather(1, self.order.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        return build_scan(grouped) or KeyScan(grouped, None, num_keys=grouped.shape[1])

    def head(self, i: int) -> LayerIndex:
        """The cells of KV head i alone (views, no copy)."""
        return LayerIndex(self.centroids[i : i + 1], self.order[i : i + 1], self.offsets[i : i + 1])

    def to(self, device: torch.device) -> LayerIndex:
        return LayerIndex(self.centroids.to(device), self.order.to(device), self.offsets.to(device))

    def to_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        parts = {"centroids": self.centroids, "order": self.order, "offsets": self.offsets}
        return {f"{layer}.{name}": t.cpu().contiguous() for name, t in parts.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layer: int, num_keys: int) -> LayerIndex:
        """Read back one layer, checking that the cells describe `num_keys` keys (else the file is not this
        memory's index)."""
        index = cls(tensors[f"{layer}.centroids"].float(), tensors[f"{layer}.order"].long(),
                    tensors[f"{layer}.offsets"].long())  # fmt: skip
        h, c = index.centroids.shape[:2]
        ok = (
            index.order.shape == (h, num_keys) and index.offsets.shape == (h, c + 1)
            and bool((index.offsets[:, -1] == num_keys).all()) and bool((index.offsets.diff(dim=1) >= 0).all())
            and (num_keys == 0 or (int(index.order.min()) >= 0 and int(index.order.max()) < num_keys))
        )  # fmt: skip
        if not ok:
            raise ValueError(f"layer {layer}: the index does not describe {num_keys} keys")
        return index


def _assign(data: torch.Tensor, centres: torch.Tensor, block: int = 65_536) -> torch.Tensor:
    return torch.cat([(data[i : i + block] @ centres.T).argmax(-1) for i in range(0, data.shape[0], block)])


def approximate_candidates(
    q: torch.Tensor,
    keys: torch.Tensor,
    index: LayerIndex,
    k: int,
    settings: IndexSettings,
    scan: KeyScan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortlisted memory keys for q (B, H, R, D) with their exact scores q . key: both (B, H, R, C), C the
    shortlist (settings.shortlist). `scan` is `index.scan_of(keys)` (built here when not given). Slots the probed
    cells could not fill hold index 0 with score -inf, so they are never selected over real keys."""

    scan = scan if scan is not None else index.scan_of(keys)
    b, h, rows, d = q.shape
    n = keys.shape[1]
    count = settings.shortlist(k, n)
    flat = q.transpose(0, 1).reshape(h, b * rows, d)  # a head's queries: rows of every batch entry
    nprobe = settings.probes(index.nlist)
    cand = torch.zeros((h, b * rows, count), dtype=torch.long, device=q.device)
    valid = torch.ones((h, b * rows, count), dtype=torch.bool, device=q.device)
    step = max(1, SCORE_BLOCK // n)
    for r0 in range(0, b * rows, step):
        qs = flat[:, r0 : r0 + step]
        # the cells each head's queries probe, as one (H, C) mask: a cell probed by several queries is scanned once.
        # Each query's nprobe best cells are those at or above its nprobe-th best score (kthvalue: much cheaper
        # than topk for a large nprobe; a tie can add a cell).
        cell_scores = torch.matmul(qs.float(), index.centroids.transpose(1, 2))  # (H, r, C)
        nth = cell_scores.kthvalue(index.nlist - nprobe + 1, dim=-1, keepdim=True).values
        mask = (cell_scores >= nth).any(1)
        if scan.packed is not None:  # the compiled kernel scans the probed cells' key blocks and keeps a shortlist
            top = scan.kernel(qs.shape[-2]).scan_int8_topk_cells(
                scan.query(qs), scan.packed, scan.colsums, n, count, mask, index.offsets, _FULL_SCAN_SHARE
            )
            cand[:, r0 : r0 + step] = index.order.gather(1, top.clamp_min(0).flatten(1)).view_as(top)
            valid[:, r0 : r0 + step] = top >= 0
            continue
        head, cell = mask.nonzero(as_tuple=True)
        starts, ends = index.offsets[head, cell], index.offsets[head, cell + 1]
        per_head = torch.zeros(h, dtype=torch.long, device=q.device).index_add_(0, head, ends - starts).tolist()
        positions = _ranges(starts, ends).split(per_head)  # each head's probed keys, in cell order
        prepared = scan.query(qs)
        for j in range(h):
            qj = prepared[j]
            if per_head[j] > _FULL_SCAN_SHARE * n:
                rank, where = scan.head_scores(qj, j), None  # nearly everything is probed: scan it all in place
            else:
                rank, where = scan.head_scores(qj, j, positions[j]), positions[j]
            take = min(count, rank.shape[-1])
            top = fast_topk(rank, take)  # positions in the scanned keys
            cand[j, r0 : r0 + step, :take] = index.order[j, top if where is None else where[top]]
            valid[j, r0 : r0 + step, take:] = False
    cand = cand.view(h, b, rows, count).transpose(0, 1)
    valid = valid.view(h, b, rows, count).transpose(0, 1)
    scores = exact_scores(q, keys, cand).masked_fill(~valid, float("-inf"))
    return scores, cand


def _ranges(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(s, e) for each pair."""
    lengths = ends - starts
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def memory_fingerprint(segments_key: list[tuple], policy: str, settings_key: str) -> str:
    """Identifies the keys an index was built over: documents (text checksum, tokens, storage, stride, window) in
    order, the position policy, and the index settings. Memorizing is deterministic, so equal fingerprints mean
    equal keys (up to float rounding, which re-ranking makes harmless)."""
    h = hashlib.sha256(repr((segments_key, policy, settings_key)).encode())
    return h.hexdigest()
