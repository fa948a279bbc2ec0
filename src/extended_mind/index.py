"""Approximate top-k for large memories: one faiss IVF index (inner product) per layer and KV head, whose
candidates are re-ranked by their exact logits.

Attention keys defeat graph indexes (HNSW recall 0.05-0.79 in ../shared/DESIGN.md) but cluster well enough for
IVF: a query probes the `nprobe` nearest of `nlist` k-means cells and scans only their keys (centred). The index returns
`candidates` x k keys per query; those are scored exactly (q . k, in the model's dtype) and the best k kept, so
approximation can only miss a key, never misorder or misscore the ones it returns.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .attention import exact_scores
from .errors import ExtendedMindError

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; this names the problem if it is missing
    faiss = None

DEFAULT_APPROX_THRESHOLD = 65_536  # memory tokens from which search is approximate, unless the caller says otherwise


@dataclass(frozen=True)
class IndexSettings:
    """How approximate search is built and queried."""

    nlist: int | None = None  # k-means cells per (layer, KV head); None: about 4 sqrt(N), at most 4096
    nprobe: int | None = None  # cells scanned per query; None: a fifth of the cells (see `probes`)
    candidates: int = 4  # keys taken from the index per retrieved key, then re-ranked exactly
    train_points_per_cell: int = 48  # k-means training sample size per cell (faiss needs >= 39)
    seed: int = 0

    def cells(self, n: int) -> int:
        nlist = self.nlist if self.nlist is not None else int(4 * math.sqrt(n))
        return max(1, min(nlist, 4096, n // 39))  # every cell needs enough training points

    def probes(self, nlist: int) -> int:
        # Later SmolLM2 layers attend diffusely: their top-10 keys spread over many cells. Recall@10 on a
        # 28k-token memory with 669 cells (a development probe): 0.79 at 16 probes, 0.87 at 32, 0.92 at 64,
        # 0.96 at 128.
        return self.nprobe if self.nprobe is not None else max(1, math.ceil(nlist / 5))

    def key(self, n: int) -> str:
        return f"ivf-centred-fp16-{self.cells(n)}-seed{self.seed}"


def require_faiss() -> None:
    if faiss is None:
        raise ExtendedMindError("approximate search needs the faiss-cpu package: pip install faiss-cpu")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class LayerIndex:
    """IVF indexes of one layer's rotated memory keys, one per KV head."""

    def __init__(self, heads: list):
        self.heads = heads

    @classmethod
    def build(cls, keys: torch.Tensor, settings: IndexSettings) -> LayerIndex:
        """keys (H, N, D): the layer's memory keys as attention sees them (rotated for the position policy)."""
        require_faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())
        _, n, d = keys.shape
        nlist = settings.cells(n)
        rng = np.random.default_rng(settings.seed)
        heads = []
        for x in keys:
            # centred: q . (k - mean) ranks keys as q . k does (the shift is the same for every key), and the
            # cells then split the keys by what differs between them rather than by their large shared part
            data = _numpy(x)
            data = np.ascontiguousarray(data - data.mean(0, keepdims=True))
            quantizer = faiss.IndexFlatIP(d)
            # lists hold float16 keys: half the bytes to scan; candidates are re-scored from the exact keys anyway
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            sample = min(n, nlist * settings.train_points_per_cell)
            train = data[rng.choice(n, sample, replace=False)] if sample < n else data
            index.cp.seed = settings.seed
            index.cp.niter = 10
            index.train(train)
            index.add(data)
            heads.append(_to_gpu(index, keys.device))
        return cls(heads)

    def search(self, queries: torch.Tensor, count: int, settings: IndexSettings) -> torch.Tensor:
        """queries (H, R, D) -> candidate indices (H, R, count), -1 where a probe found fewer keys."""
        out = []
        for index, q in zip(self.heads, queries):
            index.nprobe = min(settings.probes(index.nlist), index.nlist)
            _, idx = index.search(_numpy(q), count)
            out.append(torch.from_numpy(idx))
        return torch.stack(out).to(queries.device)

    def to_bytes(self) -> list[np.ndarray]:
        return [faiss.serialize_index(_to_cpu(h)) for h in self.heads]

    @classmethod
    def from_bytes(cls, blobs: list[np.ndarray]) -> LayerIndex:
        require_faiss()
        return cls([faiss.deserialize_index(np.asarray(b, dtype=np.uint8)) for b in blobs])


def _gpu_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: dict[int, object] = {}


def _to_gpu(index, device: torch.device):
    """Search on the GPU when the model is there and faiss was built with GPU support (faiss-gpu); else CPU."""
    if not _gpu_available(device):
        return index
    gpu = device.index or 0
    resources = _GPU_RESOURCES.setdefault(gpu, faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(resources, gpu, index)


def _to_cpu(index):
    on_gpu = hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def approximate_candidates(
    q: torch.Tensor, keys: torch.Tensor, index: LayerIndex, k: int, settings: IndexSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """The index's candidates for q (B, H, R, D) with their exact scores q . key: both (B, H, R, C), C = candidates
    x k. Slots a probe could not fill hold index 0 with score -inf, so they are never selected over real keys."""
    b, h, rows, d = q.shape
    flat = q.transpose(0, 1).reshape(h, b * rows, d)
    count = max(k * settings.candidates, k)
    faiss.omp_set_num_threads(torch.get_num_threads())  # as many threads as the model uses
    cand = index.search(flat, count, settings)  # (H, B*R, C)
    cand = cand.view(h, b, rows, -1).transpose(0, 1)
    valid = cand >= 0
    cand = cand.clamp_min(0)
    scores = exact_scores(q, keys, cand).masked_fill(~valid, float("-inf"))
    return scores, cand


def memory_fingerprint(segments_key: list[tuple], policy: str, settings_key: str) -> str:
    """Identifies the keys an index was built over: documents (text checksum, tokens, storage, stride, window) in
    order, the position policy, and the index settings. Memorizing is deterministic, so equal fingerprints mean
    equal keys (up to float rounding, which re-ranking makes harmless)."""
    h = hashlib.sha256(repr((segments_key, policy, settings_key)).encode())
    return h.hexdigest()
