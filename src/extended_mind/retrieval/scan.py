"""Low-precision copies of memory keys that exact search scans to shortlist candidates.

Exact search reads every memory key for every query, so its cost is the bytes read. The scan reads a compact copy
of the keys, keeps a shortlist of the best `shortlist(k)` keys per query, and attention then scores only those with
the full-precision keys: the logits it uses are exact, and the shortlist only has to contain the true top-k.

- int8 (CPU): one int8 code per number, with one scale per (head, dimension) (symmetric absmax over the keys).
  The scales are folded into the query (q . k = sum_i (q_i s_i) c_i), which is then quantized per row, so
  `torch._int_mm` (int8 x int8 -> int32) gives scores that rank keys with no further pass over them: a quarter of
  the float32 bytes. Scanning SmolLM2's 30 layers over 16k keys with 1 thread: 8.7 ms against 20.6 ms in bfloat16
  (a development probe). Where the compiled AVX512-VNNI kernel is available (native.py) the codes are packed for
  it instead, and it keeps each query's shortlist while it scans (about 1.6x faster than `_int_mm` for a decode
  step's 3 query rows, with no score matrix to rank).
- bfloat16 (CUDA; on a CPU where it measures fastest): half the bytes.

Which one a CPU uses is measured, not assumed (scan_select.py): on some CPUs the plain float32 scan is fastest.

Containment, measured on SmolLM2 with a 17k-token memory of real text (237,600 exact top-10 keys of real prompts,
a development probe): a shortlist of 2k + 8 held all of them with int8 and with bfloat16; 16 held 99.97% (int8).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from extended_mind.retrieval.native import pack_keys, scan_kernel, scan_kernel_avx2

PACKED_KINDS = {"int8-vnni": scan_kernel, "int8-avx2": scan_kernel_avx2}  # compiled kernels over packed keys


# The shortlist: SHORTLIST_FACTOR x k + SHORTLIST_EXTRA candidates per query, scored exactly afterwards.
MANY_ROWS = 32  # query rows per KV head from which a call counts as "many"
SHORTLIST_FACTOR = 2


SHORTLIST_EXTRA = 8


def shortlist_size(k: int, n: int) -> int:
    return min(n, SHORTLIST_FACTOR * k + SHORTLIST_EXTRA)


def fast_topk(scores: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """Indices of the k largest values along the last dimension, like `scores.topk(k).indices` (up to the order
    of ties). For long rows, the maxima of blocks of `block` values are ranked first: the top-k values lie in the
    k blocks with the largest maxima, so only those are searched (2-10x faster than topk over 16k-256k values)."""
    n = scores.shape[-1]
    if block is None:  # smaller blocks leave fewer candidates to search; larger ones fewer maxima to rank
        block = 32 if n < (1 << 17) else 64
    nb = n // block
    if nb < 4 * k or n < 8192:  # short rows: topk is as fast
        return scores.topk(min(k, n), dim=-1).indices
    blocks = scores[..., : nb * block].unflatten(-1, (nb, block)).amax(-1).topk(k, dim=-1).indices
    cand = (blocks.unsqueeze(-1) * block + torch.arange(block, device=scores.device)).flatten(-2)
    if nb * block < n:  # the last, partial block is always searched
        tail = torch.arange(nb * block, n, device=scores.device).expand(*scores.shape[:-1], -1)
        cand = torch.cat([cand, tail], dim=-1)
    pos = scores.gather(-1, cand).topk(k, dim=-1).indices
    return cand.gather(-1, pos)


@lru_cache(maxsize=1)
def int8_matmul_available() -> bool:
    """Whether torch._int_mm runs on the CPU (it is a private op: checked, not assumed)."""
    try:
        a = torch.ones(3, 16, dtype=torch.int8)
        return bool(torch._int_mm(a, a.t())[0, 0] == 16)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over dimension `dim`: (codes, scales), x ~ codes * scales (scales keep `dim`, size 1)."""
    xf = x.float()
    scales = xf.abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.round(xf / scales).clamp_(-127, 127).to(torch.int8), scales


@dataclass
class KeyScan:
    """A compact copy of one layer's keys (H, N, D) for shortlisting: int8 codes with per-dimension scales (packed
    for the compiled kernel when it is available, retrieval/native.py), or bfloat16."""

    codes: torch.Tensor | None  # (H, N, D) int8 or bfloat16; None when packed
    scales: torch.Tensor | None  # (H, 1, D) float32 for int8
    packed: torch.Tensor | None = None  # (H, B, D * 16) int8 in the kernel's layout (native.pack_keys)
    colsums: torch.Tensor | None = None  # (H, B * 16) int32
    num_keys: int = 0
    packed_kind: str = "int8-vnni"  # which compiled kernel packed `packed` (PACKED_KINDS)
    # (few query rows, many): the compiled kernel measured faster here for that many rows (scan_select.py); None:
    # packed_kind's own
    row_kernels: tuple[str | None, str | None] = (None, None)

    def kernel(self, rows: int = 1):
        """The compiled kernel module that scans `packed` for `rows` query rows per head: of the kernels that read
        this packing, the one measured faster here for that many rows (`row_kernels`)."""
        kind = self.row_kernels[rows >= MANY_ROWS]
        if kind is not None and kind != self.packed_kind and PACKED_KINDS[kind]() is not None:
            return PACKED_KINDS[kind]()
        return PACKED_KINDS[self.packed_kind]()

    @classmethod
    def of_kind(cls, keys: torch.Tensor, kind: str) -> KeyScan:
        """The scan of keys (H, N, D) of one kind: "int8-vnni" / "int8-avx2" (packed for a compiled kernel), "int8"
        (torch._int_mm) or "bfloat16"."""
        n = keys.shape[1]
        if kind == "bfloat16":
            return cls(keys.to(torch.bfloat16).contiguous(), None, num_keys=n)
        codes, scales = quantize_int8(keys, dim=1)
        if kind in PACKED_KINDS:
            if keys.shape[-1] % 4 or PACKED_KINDS[kind]() is None:
                raise ValueError(f"the {kind} scan needs its compiled kernel and a head size divisible by 4")
            return cls(None, scales, *pack_keys(codes), num_keys=n, packed_kind=kind)
        if kind == "int8":
            return cls(codes.contiguous(), scales, num_keys=n)
        raise ValueError(f"unknown scan kind {kind!r}")

    def head(self, i: int) -> KeyScan:
        """The scan of KV head i alone (views, no copy)."""

        def one(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[i : i + 1]

        return KeyScan(one(self.codes), one(self.scales), one(self.packed), one(self.colsums), self.num_keys,
                       self.packed_kind, self.row_kernels)  # fmt: skip

    @property
    def kind(self) -> str:
        if self.packed is not None:
            return self.packed_kind
        return "int8" if self.scales is not None else str(self.codes.dtype).removeprefix("torch.")

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """Queries (..., H, R, D) in the form the scan multiplies: int8 codes of q times the per-dimension scales
        (quantized per row: the row's own scale is one positive factor, which cannot change a ranking, so it is
        dropped), or bfloat16."""
        if self.scales is None:
            return q.to(self.codes.dtype)
        return quantize_int8(q * self.scales)[0]

    def scores(self, q: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Ranking scores of every key for queries q (B, H, R, D): (B, H, R, N), equal to q . key up to a positive
        factor per query row (and the scan's rounding); int32 from an int8 scan, else float32. With `weights`
        (H, N) the scores are multiplied by them (float32)."""
        qp = self.query(q)
        if self.packed is not None:
            kernel = self.kernel(q.shape[-2])
            n = self.num_keys
            scores = torch.stack([kernel.scan_int8(qp[i], self.packed, self.colsums)[..., :n] for i in range(len(q))])
        elif self.scales is None:
            scores = torch.matmul(qp, self.codes.transpose(1, 2)).float()
        else:
            b, h, rows, _ = q.shape
            scores = torch.empty((b, h, rows, self.codes.shape[1]), dtype=torch.int32, device=q.device)
            for i in range(b):
                for j in range(h):
                    # (N, D) codes read through a transposed view: the layout _int_mm scans fastest
                    torch._int_mm(qp[i, j], self.codes[j].t(), out=scores[i, j])
        return scores if weights is None else scores * weights[None, :, None, :]

    def shortlist(self, q: torch.Tensor, size: int) -> torch.Tensor:
        """Indices (B, H, R, size) of the keys with the best ranking scores (as `scores`) for queries q (B, H, R, D),
        in no particular order. The kernel keeps them while it scans; otherwise the scores are ranked."""
        if self.packed is None:
            return fast_topk(self.scores(q), size)
        kernel, qp = self.kernel(q.shape[-2]), self.query(q)
        return torch.stack(
            [kernel.scan_int8_topk(qp[i], self.packed, self.colsums, self.num_keys, size) for i in range(len(q))]
        )

    def head_scores(self, qp: torch.Tensor, head: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Ranking scores (as `scores`) of prepared queries qp (R, D) against the keys of one KV head: all of
        them, or the keys at `rows` (M,) only: (R, N or M). For scans in rows (a packed scan goes through the
        kernel's own selection)."""
        if self.codes is None:
            raise ValueError("head_scores reads codes in rows; this scan is packed for the kernel")
        codes = self.codes[head] if rows is None else self.codes[head].index_select(0, rows)
        if self.scales is None:
            return torch.matmul(qp, codes.T).float()
        return torch._int_mm(qp, codes.t())
