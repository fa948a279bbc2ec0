"""Approximate search (IVF over an int8 scan + exact re-ranking) against exact search: planted neighbours are
found, probing every cell reproduces exact search, generation through an index equals exact generation when the
index is exhaustive, and indexes are saved with the memory, reused after loading and rebuilt after edits; the
low-precision scans shortlist the exact top-k."""

from __future__ import annotations

import pytest
import torch

from extended_mind import ExtendedMind, ExtendedMindError
from extended_mind.retrieval.index import IndexSettings, LayerIndex, approximate_candidates

# no repeated sentences: repeated text gives near-equal keys, whose order in a top-k is a tie-break
TEXT = " ".join(f"Line {i}: the {w} of {c} weighs {i * 37 % 101} grams." for i, (w, c) in enumerate(
    [(w, c) for w in ("stone", "apple", "lamp", "boot", "drum") for c in ("Oslo", "Lyon", "Cork", "Graz")]
)) + " The secret number is 4417."  # fmt: skip


@pytest.fixture(params=["int8-vnni", "int8-avx2", "int8"])
def scan_path(request, monkeypatch):
    """Run an approximate-search test with each compiled int8 kernel and with torch._int_mm."""
    _use_scan(request.param, monkeypatch)
    return request.param


def test_planted_neighbours_are_found(scan_path):
    torch.manual_seed(0)
    h, n, d = 2, 6000, 32
    keys = torch.randn(h, n, d)
    queries = torch.randn(1, h, 40, d)
    planted = torch.randint(0, n, (h, 40))
    for head in range(h):
        keys[head, planted[head]] = 4 * queries[0, head]  # each query's best key by far
    settings = IndexSettings(nprobe=8)
    index = LayerIndex.build(keys, settings)
    scores, cand = approximate_candidates(queries, keys, index, 5, settings)
    best = cand.gather(-1, scores.argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(best[0], planted)


def test_probing_every_cell_equals_exact_search(scan_path):
    torch.manual_seed(1)
    keys, queries = torch.randn(3, 4000, 16), torch.randn(2, 3, 7, 16)
    # every cell probed: the int8 scan's shortlist (2k + 8) leaves room for rounding at the k-th place
    settings = IndexSettings(nlist=32, nprobe=32, candidates=2)
    scores, cand = approximate_candidates(queries, keys, LayerIndex.build(keys, settings), 10, settings)
    exact = torch.matmul(queries, keys.transpose(1, 2)).topk(10, dim=-1)
    best = scores.topk(10, dim=-1)
    assert torch.equal(cand.gather(-1, best.indices), exact.indices)
    torch.testing.assert_close(best.values, exact.values)


def test_recall_of_the_default_settings_on_clustered_keys(scan_path):
    torch.manual_seed(2)
    centers = torch.randn(64, 32) * 3
    keys = (centers[torch.randint(0, 64, (20000,))] + torch.randn(20000, 32))[None]
    queries = (centers[torch.randint(0, 64, (200,))] + torch.randn(200, 32))[None, None]
    settings = IndexSettings()
    scores, cand = approximate_candidates(queries, keys, LayerIndex.build(keys, settings), 10, settings)
    found = cand.masked_fill(scores == float("-inf"), -1).sort(-1).values
    assert ((found.diff(dim=-1) > 0) | (found[..., 1:] < 0)).all()  # no key shortlisted twice
    top = cand.gather(-1, scores.topk(10, dim=-1).indices)
    exact = torch.matmul(queries, keys.transpose(1, 2)).topk(10, dim=-1).indices
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top[0, 0], exact[0, 0])) / exact.numel()
    assert recall >= 0.95, recall


@pytest.mark.parametrize("ranking", ["logit", "cosine"])
def test_exhaustive_index_generates_exactly_like_exact_search(tiny_mind: ExtendedMind, ranking):
    memory = tiny_mind.memorize(TEXT)
    # every cell probed and every key a candidate (4 x 200 > the memory's tokens): nothing is left to approximate
    exhaustive = IndexSettings(nlist=4, nprobe=4, candidates=200)
    options = dict(topk=4, max_new_tokens=8, chat=False, ranking=ranking)
    exact = tiny_mind.generate("The secret", memory=memory, search="exact", **options)
    approx = tiny_mind.generate("The secret", memory=memory, search="approximate", index=exhaustive, **options)
    assert [t.id for t in approx.tokens] == [t.id for t in exact.tokens]
    # near-tied keys may swap places (the candidates' scores are summed in another order), so citations are
    # compared by their spans and the logits within float tolerance
    assert [(c.doc, c.start) for c in approx.citations[:3]] == [(c.doc, c.start) for c in exact.citations[:3]]
    ids = torch.tensor([tiny_mind.encode_prompt("The secret", chat=False)])
    torch.testing.assert_close(
        tiny_mind.logits(ids, memory=memory, search="approximate", index=exhaustive, topk=4, ranking=ranking),
        tiny_mind.logits(ids, memory=memory, search="exact", topk=4, ranking=ranking),
        atol=1e-4,
        rtol=1e-4,
    )


def test_auto_search_switches_at_the_threshold(tiny_mind: ExtendedMind, monkeypatch):
    memory = tiny_mind.memorize(TEXT)
    built = []
    real_build = LayerIndex.build
    monkeypatch.setattr(LayerIndex, "build", classmethod(lambda cls, *a: built.append(1) or real_build(*a)))
    tokens = dict(retrieval="tokens", max_new_tokens=2)
    tiny_mind.generate("x", memory=memory, approx_threshold=memory.num_tokens + 1, **tokens)
    assert built == []
    tiny_mind.generate("x", memory=memory, approx_threshold=memory.num_tokens, **tokens)
    assert len(built) == memory.num_layers
    # block memory's auto search stays exact at any size; asked for, approximate search builds its indexes
    built.clear()
    tiny_mind.generate("x", memory=memory, max_new_tokens=2, approx_threshold=0)
    assert built == []
    tiny_mind.build_index(memory, only_above_threshold=True, approx_threshold=0)
    assert built == []
    tiny_mind.generate("x", memory=memory, max_new_tokens=2, search="approximate")
    assert len(built) == memory.num_layers
    with pytest.raises(ExtendedMindError, match="unknown search"):
        tiny_mind.generate("x", memory=memory, search="fast")


def test_indexes_are_saved_reused_and_rebuilt_after_edits(tiny_mind: ExtendedMind, tmp_path, monkeypatch):
    memory = tiny_mind.memorize(TEXT)
    settings = IndexSettings(nlist=4, nprobe=2)
    first = tiny_mind.generate("The secret", memory=memory, search="approximate", index=settings, max_new_tokens=6)
    memory.save(tmp_path / "m")
    loaded = tiny_mind.load_memory(tmp_path / "m")

    def no_build(*args):
        raise AssertionError("the saved index should have been used")

    monkeypatch.setattr(LayerIndex, "build", no_build)
    again = tiny_mind.generate("The secret", memory=loaded, search="approximate", index=settings, max_new_tokens=6)
    assert [t.id for t in again.tokens] == [t.id for t in first.tokens]

    monkeypatch.undo()
    tiny_mind.add(loaded, "Another document about owls.")  # the keys changed: the old index no longer applies
    tiny_mind.generate("The secret", memory=loaded, search="approximate", index=settings, max_new_tokens=2)
    loaded.save()
    files = list((tmp_path / "m" / "tensors").iterdir())
    assert len(files) == 2 + 1 + 1  # two documents, rotary tables, one index (the stale one was deleted)


SCAN_KINDS = ["int8", "int8-vnni", "int8-avx2", "bfloat16"]


def _use_scan(kind: str, monkeypatch) -> None:
    """Make scan_select.build_scan choose `kind` (int8-vnni: the compiled kernel, skipped where it cannot be built)."""
    from extended_mind.retrieval import native, scan_select

    kernels = {"int8-vnni": native.scan_kernel, "int8-avx2": native.scan_kernel_avx2}
    if kind in kernels and kernels[kind]() is None:
        pytest.skip(f"the {kind} scan kernel cannot be built or used on this machine")
    monkeypatch.setattr(scan_select, "scan_path", lambda: kind)


@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_low_precision_scan_with_exact_rescoring_equals_the_float32_scan(tiny_mind: ExtendedMind, monkeypatch, kind):
    from extended_mind.engine import positions

    memory = tiny_mind.memorize(TEXT)
    ids = torch.tensor([tiny_mind.encode_prompt("The secret", chat=False)])
    for ranking in ("logit", "cosine"):
        options = dict(topk=4, ranking=ranking, search="exact")
        monkeypatch.setattr(positions, "LOW_PRECISION_SCAN_MIN", 10**9)
        plain = tiny_mind.generate("The secret", memory=memory, max_new_tokens=8, chat=False, **options)
        plain_logits = tiny_mind.logits(ids, memory=memory, **options)
        monkeypatch.setattr(positions, "LOW_PRECISION_SCAN_MIN", 0)
        _use_scan(kind, monkeypatch)
        memory.prepared_layers.clear()
        scanned = tiny_mind.generate("The secret", memory=memory, max_new_tokens=8, chat=False, **options)
        prepared = next(iter(memory.prepared_layers.values()))  # block memory prepares its selection layers only
        assert all(layer.scan.kind == kind for layer in prepared.values())
        assert [t.id for t in scanned.tokens] == [t.id for t in plain.tokens]
        torch.testing.assert_close(tiny_mind.logits(ids, memory=memory, **options), plain_logits)
        memory.prepared_layers.clear()


@pytest.mark.parametrize("n", [8192, 9000, 70_001])
def test_fast_topk_finds_the_largest_values(n):
    from extended_mind.retrieval.scan import fast_topk

    torch.manual_seed(n)
    for scores in (torch.randn(2, 3, 4, n), torch.randint(0, 50, (2, 3, 4, n)).float()):  # the second: many ties
        for k in (1, 10, 56):
            got = scores.gather(-1, fast_topk(scores, k)).sort(-1).values
            assert torch.equal(got, scores.topk(k, dim=-1).values.sort(-1).values)
    planted = torch.full((1, 1, 1, n), -1.0)
    planted[..., -1] = 5.0  # in the partial last block
    assert fast_topk(planted, 3)[0, 0, 0, 0] == n - 1


@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_scan_shortlist_holds_the_exact_top_k(kind, monkeypatch):
    from extended_mind.retrieval import scan, scan_select
    from extended_mind.retrieval.scan import fast_topk

    _use_scan(kind, monkeypatch)
    torch.manual_seed(3)
    # keys of very different norms and a few large dimensions, as attention keys have; 9001: a partial last block
    n = 9001
    keys = torch.randn(2, n, 64) * torch.rand(2, n, 1) * 3
    keys[..., :4] *= 8
    queries = torch.randn(2, 2, 6, 64)
    key_scan = scan_select.build_scan(keys)
    assert key_scan.kind == kind
    scores = key_scan.scores(queries)
    assert scores.shape == (2, 2, 6, n)
    for k in (1, 10, 32):
        size = scan.shortlist_size(k, n)
        shortlist = key_scan.shortlist(queries, size)
        assert shortlist.shape == (2, 2, 6, size) and int(shortlist.max()) < n
        assert (shortlist.sort(-1).values.diff(dim=-1) > 0).all()  # no key twice
        # the scan's own best `size` keys (up to ties at the last place) ...
        assert torch.equal(
            scores.gather(-1, shortlist).sort(-1).values, scores.gather(-1, fast_topk(scores, size)).sort(-1).values
        )
        # ... hold the exact top-k
        exact = torch.matmul(queries, keys.transpose(1, 2)).topk(k, dim=-1).indices
        assert (exact.unsqueeze(-1) == shortlist.unsqueeze(-2)).any(-1).all()


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
def test_int8_kernel_scores_equal_int_mm(isa):
    from extended_mind.retrieval import native

    kernel = native.scan_kernel() if isa == "vnni" else native.scan_kernel_avx2()
    if kernel is None:
        pytest.skip(f"the int8 {isa} scan kernel cannot be built or used on this machine")
    torch.manual_seed(5)
    for n, rows in ((1, 1), (15, 3), (16, 4), (33, 5), (5000, 9)):
        codes = torch.randint(-127, 128, (3, n, 64), dtype=torch.int8)
        codes[0, :, :8] = 127  # extreme codes and queries: an int16 saturation inside a kernel would show
        q_extreme = torch.full((rows, 64), -127, dtype=torch.int8)
        q = torch.randint(-127, 128, (3, rows, 64), dtype=torch.int8)
        q[0] = q_extreme
        packed, colsums = native.pack_keys(codes)
        expected = torch.stack([q[h].int() @ codes[h].int().t() for h in range(3)])
        assert torch.equal(kernel.scan_int8(q, packed, colsums)[..., :n], expected)
        best = kernel.scan_int8_topk(q, packed, colsums, n, min(n, 7))
        assert torch.equal(expected.gather(-1, best).sort(-1).values, expected.topk(min(n, 7)).values.sort(-1).values)
    with pytest.raises(RuntimeError, match="size <= keys"):
        kernel.scan_int8_topk(q, packed, colsums, n, n + 1)


def test_an_index_that_does_not_fit_the_memory_is_refused():
    torch.manual_seed(4)
    keys = torch.randn(2, 1000, 16)
    index = LayerIndex.build(keys, IndexSettings(nlist=8))
    tensors = index.to_tensors(0)
    LayerIndex.from_tensors(tensors, 0, 1000)  # fits
    with pytest.raises(ValueError, match="does not describe 1001 keys"):
        LayerIndex.from_tensors(tensors, 0, 1001)
    tensors["0.order"] = tensors["0.order"] + 5  # points past the last key
    with pytest.raises(ValueError):
        LayerIndex.from_tensors(tensors, 0, 1000)
