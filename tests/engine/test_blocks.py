"""Block memory and retrieval heads on tiny models: layout, selection, slot positions, the prior, calibration and
its cache, the sink rule and retrieval-head-only token retrieval."""

from __future__ import annotations

import json
import os

import pytest
import torch

from extended_mind.engine import heads as heads_module
from extended_mind.engine.block_layout import BlockLayout
from extended_mind.engine.blocks import Relevance, select_blocks
from extended_mind.engine.heads import calibration_sequences, head_scores, retrieval_heads
from extended_mind.engine.words import content_words
from extended_mind.memory.memory import Memory
from tests.conftest import WordEmbedder

DOCS = ["The cat sat on the mat. " * 5, "Ships sail at dawn.", "A third document, of medium length here."]


def test_blocks_never_cross_documents(tiny_mind):
    memory = tiny_mind.memorize(DOCS, ids=["a", "b", "c"])
    layout = BlockLayout.of(memory, 16)
    sizes = [s.num_tokens for s in memory.segments]
    assert int(layout.lengths.sum()) == memory.num_tokens
    assert layout.block_of.tolist() == sorted(layout.block_of.tolist())
    per_doc = [-(-n // 16) for n in sizes]
    assert layout.num_blocks == sum(per_doc)
    doc_of_block = memory.token_doc[layout.starts]
    for b in range(layout.num_blocks):  # every token of a block lies in the block's document
        tokens = layout.tokens(torch.tensor([b]))
        assert (memory.token_doc[tokens] == doc_of_block[b]).all()
    assert layout.tokens(torch.tensor([2, 0])).tolist()[:16] == list(range(32, 48))  # in the order given
    assert BlockLayout.of(memory, 16) is layout  # cached with the memory, dropped on edits
    memory.remove("b")
    assert BlockLayout.of(memory, 16) is not layout


def _plan(mind, memory, insert=1, **kw):
    options = mind.options(topk=kw.get("topk", 8), retrieval="blocks", blocks=kw.get("blocks", 2),
                           block_size=kw.get("block_size", 8), block_gate=kw.get("gate", 0.0))  # fmt: skip
    _, layers = mind.reader.prepare(memory, options)
    return mind.reader.plan(memory, layers, insert, options, options.blocks)


def test_choose_discounts_the_prior_and_keeps_document_order(tiny_mind):
    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, blocks=3)
    n = plan.layout.num_blocks
    plan.prior = torch.zeros(n)
    mass = torch.zeros(n)
    mass[[1, 4, 6]] = torch.tensor([1.0, 3.0, 2.0])
    assert plan.choose(mass).tolist() == [1, 4, 6]  # the best three, in document order
    assert plan.choose(mass, 2).tolist() == [4, 6]
    plan.prior[4] = 0.6  # block 4 draws 60% of the mass for any question: 3 - 0.6 * 6 < 2 - 0
    assert plan.choose(mass, 2).tolist() == [1, 6]
    assert plan.choose(mass).tolist() == [1, 4, 6]  # still read when there is room: it got mass
    assert plan.choose(torch.zeros(n)).tolist() == []  # nothing got mass: nothing is read
    plan.prior[4] = 0.0
    plan.gate = 0.5  # only blocks with at least half the best block's score: 3 (block 4) and 2 (block 6)
    assert plan.choose(mass).tolist() == [4, 6]
    plan.gate = 1.0
    assert plan.choose(mass).tolist() == [4]


def test_relevance_reads_only_blocks_far_above_what_unrelated_questions_draw(tiny_mind):
    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, blocks=3)
    n = plan.layout.num_blocks
    assert n > 3
    mean = torch.full((n,), 1.0 / n)
    mean[0] = 0.3  # an attractor: every unrelated question gives block 0 much of its mass...
    spread = torch.full((n,), 0.01)
    spread[0] = 0.2  # ... and how much varies from question to question
    plan.relevance, plan.min_relevance = Relevance(mean, spread), 4.0
    typical = mean.clone()
    assert plan.choose(typical).tolist() == []  # what any question draws: nothing is read
    attracted = mean.clone()
    attracted[0] = 0.6  # the attractor draws even more: still within its spread
    assert plan.choose(attracted).tolist() == []
    asked = mean.clone()
    asked[3] += 0.1  # block 3 draws ten spreads more than unrelated questions give it: read, with its neighbours
    assert plan.choose(asked).tolist() == [2, 3, 4]  # (the passage may go on past the block's edges)
    assert plan.choose(asked * 7.0).tolist() == [2, 3, 4]  # shares, not raw mass: the mass's scale does not matter
    assert plan.choose(asked, 1).tolist() == [3]  # the relevant block first, its neighbours only when there is room
    assert plan.choose(asked, 2).tolist() == [3, 4]  # the one after it before the one before it
    last = int((plan.memory.token_doc[plan.layout.starts] == 0).sum()) - 1  # the first document's last block
    at_end = mean.clone()
    at_end[last] += 0.1
    assert plan.choose(at_end).tolist() == [last - 1, last]  # never a neighbour from another document
    first_of_second = last + 1
    at_start = mean.clone()
    at_start[first_of_second] += 0.1
    assert plan.choose(at_start).tolist() == [first_of_second, first_of_second + 1]
    plan.min_relevance = 20.0
    assert plan.choose(asked).tolist() == []
    assert plan.choose(torch.zeros(n)).tolist() == []
    plan.blocks = n  # a memory that fits the slots is not held to the bar: ranked, gated, the best always read
    assert plan.choose(typical).tolist() == list(range(n))  # (gate 0: every block)
    plan.gate = 0.5
    assert plan.choose(typical).tolist() == [0, 1]  # nothing stands out: the best (a tie: the first), its successor
    assert plan.choose(asked).tolist() == [2, 3, 4]


def test_a_block_below_the_bar_is_read_when_it_stands_out_from_the_questions_other_blocks(tiny_mind):
    """block_outlier: a needle that unrelated questions draw too (repeated filler, a short memory) stays under the
    relevance bar but stands far above the question's other blocks; one that stands among as varied blocks does
    not, nor one under the floor (OUTLIER_FLOOR spreads)."""
    from extended_mind.engine.blocks import OUTLIER_FLOOR

    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, blocks=3, block_size=4)
    n = plan.layout.num_blocks
    assert n >= 12
    mean, spread = torch.full((n,), 1.0 / n), torch.full((n,), 0.01)
    plan.relevance, plan.min_relevance = Relevance(mean, spread), 4.0
    wiggle = torch.tensor([0.001 * (-1) ** i for i in range(n)])  # the other blocks: +-0.1 spreads
    needle = mean + wiggle
    needle[5] += 0.025  # about 2.5 spreads: under the bar of 4
    needle = needle / needle.sum()
    assert plan.choose(needle).tolist() == []  # outlier off (the plan's default)
    plan.outlier = 8.0
    assert plan.choose(needle).tolist() == [4, 5, 6]  # 2.5 spreads among blocks within 0.1 of each other: read
    varied = mean + torch.linspace(-0.02, 0.02, n)  # the other blocks spread over +-2 spreads
    varied[5] = mean[5] + 0.025
    assert plan.choose(varied / varied.sum()).tolist() == []  # the best of many: not standing out
    faint = mean + wiggle * 0.1
    faint[5] += 0.001 + 0.01 * (OUTLIER_FLOOR - 0.3)  # far out from its neighbours, under the floor
    assert plan.choose(faint / faint.sum()).tolist() == []
    plan.min_relevance = 0.0  # block_relevance=0 reads the best blocks anyway: the outlier test does not apply
    assert 5 in plan.choose(needle).tolist()


def test_a_relevant_block_must_share_a_word_with_the_question_unless_it_stands_far_out(tiny_mind):
    docs = ["State song: Alaska's Flag. Index of Alaska-related articles. " * 3, "The pass key is 71432. " * 4]
    memory = tiny_mind.memorize(docs, ids=["list", "key"])
    plan = _plan(tiny_mind, memory, blocks=3, block_size=32)
    n = plan.layout.num_blocks
    first_key_block = int((plan.memory.token_doc[plan.layout.starts] == 0).sum())
    assert n > 3 and plan.layout.text(memory, first_key_block) == plan.layout.texts(memory)[first_key_block]
    assert plan.layout.text(memory, first_key_block).startswith("The pass key is")
    mean, spread = torch.full((n,), 1.0 / n), torch.full((n,), 0.01)
    plan.relevance, plan.min_relevance = Relevance(mean, spread), 4.0
    plan.question_words = content_words("What is the capital of Italy?")
    attracted = mean.clone()
    attracted[0] += 0.06  # a list block drawn six spreads beyond its usual share, sharing no word with the question
    assert plan.choose(attracted).tolist() == []
    attracted[0] += 0.04  # ten spreads: past words_override (8), read on the heads' word alone
    assert plan.choose(attracted).tolist() == [0, 1]
    asked = mean.clone()
    asked[first_key_block] += 0.06
    assert plan.choose(asked).tolist() == []  # no shared word
    plan.question_words = content_words("What is the pass key?")
    assert plan.choose(asked).tolist() == [first_key_block, first_key_block + 1]  # "pass", "key"
    both = mean.clone()
    both[0] += 0.4  # 22 spreads out, but vetoed here (no shared word, override 100): not the bar the gate sets
    both[first_key_block] += 0.12  # 4.1 spreads (shares of the larger total)
    plan.gate, plan.words_override = 0.5, 100.0
    assert plan.choose(both).tolist() == [first_key_block, first_key_block + 1]
    plan.min_relevance = 0.0  # block_relevance=0: the best blocks whatever the question, words or not
    assert plan.choose(both).tolist() == [0, 1]


def test_content_words_leave_out_stopwords_and_fold_plurals():
    assert content_words("What is the capital of the United States?") == {"capital", "united", "state"}
    assert content_words("Who wrote Romeo and Juliet in 1597?") == {"wrote", "romeo", "juliet", "1597"}
    assert content_words("a I 7 x") == {"7"} and content_words("") == frozenset()


def test_slots_sit_right_before_the_rest_of_the_prompt(tiny_mind):
    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, insert=3, blocks=2, block_size=8)
    assert plan.positions(6) == [0, 1, 2, 19, 20, 21]  # head, a gap of blocks x block size, the rest
    slots = plan.slots(torch.tensor([0, 5]))
    layer = slots[0]
    assert layer.slot_tokens.tolist() == list(range(0, 8)) + list(range(40, 48))
    assert layer.slot_end == 19 and layer.keys.shape[1] == 16
    assert plan.slots(torch.zeros(0, dtype=torch.long)) == {}


def test_selection_masses_by_row_group(tiny_mind):
    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, insert=1)
    ids = list(range(40, 52))
    whole = select_blocks(tiny_mind.model, [ids], [plan.positions(12)], [plan])[0]
    groups = torch.tensor([-1] + [0] * 5 + [1] * 6)
    split = select_blocks(tiny_mind.model, [ids], [plan.positions(12)], [plan], [groups])[0]
    assert split.shape == (2, plan.layout.num_blocks)
    assert torch.allclose(split.sum(0), whole, atol=1e-4)  # the groups partition the rows after the head
    # every row and retrieval head spreads a mass of one over its top-k tokens
    heads = sum(int(m.sum()) for m in plan.heads.values())
    assert float(whole.sum()) == pytest.approx(11 * heads, rel=1e-4)


def test_a_long_question_chooses_from_evenly_spread_rows(tiny_mind, monkeypatch):
    """Past CHOOSING_ROWS question rows, only that many (evenly spread, first and last included) scan the memory:
    their mass equals the mass of exactly those rows given as a group."""
    from extended_mind.engine import blocks

    assert blocks.choosing_rows(range(12)[1:]).tolist() == list(range(1, 12))
    assert blocks.choosing_rows(range(600)[5:505], 128)[[0, -1]].tolist() == [5, 504]
    assert len(blocks.choosing_rows(range(600)[5:505], 128)) == 128
    memory = tiny_mind.memorize(DOCS)
    plan = _plan(tiny_mind, memory, insert=1)
    ids = list(range(40, 52))
    monkeypatch.setattr(blocks.choosing_rows, "__defaults__", (4,))
    sampled = select_blocks(tiny_mind.model, [ids], [plan.positions(12)], [plan])[0]
    groups = torch.full((12,), -1, dtype=torch.long)
    groups[blocks.choosing_rows(range(12)[1:], 4)] = 0
    assert int((groups == 0).sum()) == 4
    explicit = select_blocks(tiny_mind.model, [ids], [plan.positions(12)], [plan], [groups])[0][0]
    assert torch.allclose(sampled, explicit)
    heads = sum(int(m.sum()) for m in plan.heads.values())
    assert float(sampled.sum()) == pytest.approx(4 * heads, rel=1e-4)


def test_calibration_sequences_repeat_the_words():
    from tests.conftest import byte_tokenizer

    tok = byte_tokenizer()
    for ids, queries, targets in calibration_sequences(tok, trials=2):
        ids = torch.tensor(ids)
        assert torch.equal(ids[queries + 1], ids[targets])  # the token after each query is the one to copy
        assert bool((targets < queries).all())


def test_head_scores_are_cached_per_model(tiny_mind, tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path))
    scores = head_scores(tiny_mind.model, tiny_mind.tokenizer, tiny_mind.identity)
    assert scores.shape == (2, 4) and bool(((scores >= 0) & (scores <= 1)).all())
    monkeypatch.setattr(heads_module, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    assert torch.equal(head_scores(tiny_mind.model, tiny_mind.tokenizer, tiny_mind.identity), scores)
    assert len(list((tmp_path / "heads").glob("*.json"))) == 1


def test_retrieval_heads_threshold_and_floor():
    scores = torch.tensor([[0.0, 0.5, 0.05], [0.2, 0.01, 0.0]])
    chosen = retrieval_heads(scores, 0.1)
    assert {k: v.tolist() for k, v in chosen.items()} == {0: [False, True, False], 1: [True, False, False]}
    weak = retrieval_heads(scores * 0.1, 0.1)  # none reaches the threshold: the best MIN_HEADS still retrieve
    assert sum(int(v.sum()) for v in weak.values()) == 2


def test_token_retrieval_first_token_reads_no_memory(tiny_pair):
    """The sink rule: the prompt's first token (it sees only itself) reads no memory; the others do."""
    mind, reference = tiny_pair
    memory = mind.memorize("Some memory text to retrieve from. " * 3)
    prompt = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        expected = reference(prompt).logits
    got = mind.logits(prompt, memory=memory, topk=4, retrieval="tokens", position_policy="zero")
    assert torch.allclose(got[:, 0], expected[:, 0], atol=1e-5)
    assert (got[:, 1:] - expected[:, 1:]).abs().max() > 1e-3


def test_retrieval_heads_only_token_retrieval(tiny_mind, monkeypatch):
    """memory_heads="retrieval": only calibrated heads read memory. With every head of layer 1 (and none of layer
    0) a retrieval head, that is exactly memory in layer 1 only."""
    memory = tiny_mind.memorize(DOCS)
    scores = torch.zeros(2, 4)
    scores[1] = 0.9
    monkeypatch.setattr(tiny_mind, "_head_scores", scores)
    prompt = torch.randint(0, 256, (1, 10))
    options = dict(memory=memory, topk=3, retrieval="tokens")
    only_heads = tiny_mind.logits(prompt, memory_heads="retrieval", **options)
    assert torch.equal(only_heads, tiny_mind.logits(prompt, memory_layers=[1], **options))
    scores[1, :2] = 0.0  # two heads of layer 1 only: something in between
    partial = tiny_mind.logits(prompt, memory_heads="retrieval", **options)
    assert not torch.equal(partial, only_heads)


@pytest.mark.parametrize("scan", ["int8", "float32"])
def test_selection_keys_stay_stored_and_score_the_same(tiny_mind, monkeypatch, scan):
    """Block selection keeps bfloat16 keys as stored when a compact copy shortlists them (no float32 copy, no
    values): the masses are the ones a float32 copy of the same keys gives. Scanned plain, keys are float32."""
    from extended_mind.engine import positions
    from extended_mind.retrieval import scan_select

    monkeypatch.setattr(positions, "LOW_PRECISION_SCAN_MIN", 0)
    monkeypatch.setenv("EXTENDED_MIND_SCAN", scan)
    scan_select.scan_path.cache_clear()
    try:
        memory = tiny_mind.memorize(DOCS, storage="bfloat16")
        wide = memory.astype("float32")
        plan, wide_plan = _plan(tiny_mind, memory), _plan(tiny_mind, wide)
        layer, wide_layer = next(iter(plan.layers.values())), next(iter(wide_plan.layers.values()))
        assert layer.values.numel() == 0 and layer.keys.dtype == (torch.bfloat16 if scan == "int8" else torch.float32)
        assert wide_layer.keys.dtype == torch.float32
        ids = list(range(40, 52))
        mass = select_blocks(tiny_mind.model, [ids], [plan.positions(12)], [plan])[0]
        wide_mass = select_blocks(tiny_mind.model, [ids], [wide_plan.positions(12)], [wide_plan])[0]
        assert float(mass.sum()) > 0 and torch.equal(mass, wide_mass)
    finally:
        scan_select.scan_path.cache_clear()


def test_prepared_selection_is_kept_and_reused(tiny_mind, tmp_path, monkeypatch):
    """A large memory's prepared selection keys are written to the cache once; a reopened memory maps them instead
    of preparing again, and answers the same."""
    from extended_mind import Memory
    from extended_mind.engine import positions, prepared
    from extended_mind.memory import mapped
    from extended_mind.retrieval import scan_select

    for module in (prepared, mapped):  # prepared keys and their checks in a fresh folder (built kernels stay cached)
        monkeypatch.setattr(module, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(positions, "LOW_PRECISION_SCAN_MIN", 0)
    monkeypatch.setattr(prepared, "PERSIST_MIN", 0)
    monkeypatch.setenv("EXTENDED_MIND_SCAN", "int8")
    scan_select.scan_path.cache_clear()
    try:
        path = tiny_mind.memorize(DOCS, storage="bfloat16").save(tmp_path / "m")
        options = dict(max_new_tokens=4, blocks=2, block_size=8, topk=6)
        first = tiny_mind.generate("The cat", memory=Memory.load(path), **options)
        assert len(list((tmp_path / "cache" / "prepared").glob("*.safetensors"))) == 1
        monkeypatch.setattr(positions, "_prepare", lambda *a: pytest.fail("prepared again"))
        again = tiny_mind.generate("The cat", memory=Memory.load(path), **options)
        def seen(r):
            return [(t.id, [(c.doc, c.start, c.end, c.weight) for c in t.citations]) for t in r.tokens]

        assert seen(again) == seen(first)
        for f in (tmp_path / "cache" / "prepared").glob("*.safetensors"):  # a damaged file is prepared again
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
        with pytest.raises(pytest.fail.Exception, match="prepared again"):
            tiny_mind.generate("The cat", memory=Memory.load(path), **options)
    finally:
        scan_select.scan_path.cache_clear()


def test_prepared_selection_is_saved_with_the_memory(tiny_mind, tmp_path, monkeypatch, caplog):
    """A large memory's prepared selection keys are written by its save (with per-tensor checksums): a load with
    nothing in the cache maps them instead of preparing, and answers the same; a copy saved elsewhere carries them,
    a damaged tensor is prepared again with a warning, a missing file leaves the memory readable, editing the
    documents drops them, and $EXTENDED_MIND_SAVE_PREPARED=0 saves none."""
    from extended_mind import Memory
    from extended_mind.base.errors import MemoryFileError
    from extended_mind.engine import positions, prepared
    from extended_mind.memory import mapped
    from extended_mind.retrieval import scan_select

    for module in (prepared, mapped):
        monkeypatch.setattr(module, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv(prepared.KEEP_ENV, "0")  # the cache keeps nothing: only the memory can hold them
    monkeypatch.setattr(positions, "LOW_PRECISION_SCAN_MIN", 0)
    monkeypatch.setattr(prepared, "PERSIST_MIN", 0)
    monkeypatch.setenv("EXTENDED_MIND_SCAN", "int8")
    scan_select.scan_path.cache_clear()
    real_prepare = positions._prepare
    try:
        memory = tiny_mind.memorize(DOCS, storage="bfloat16")
        options = dict(max_new_tokens=4, blocks=2, block_size=8, topk=6, chat=False)
        first = [t.id for t in tiny_mind.generate("The cat", memory=memory, **options).tokens]
        path = memory.save(tmp_path / "m")
        entries = json.loads((path / "manifest.json").read_text())["prepared"]
        assert len(entries) == 1 and (path / entries[0]["file"]).is_file()
        assert any(name.endswith(".scan.codes") for name in entries[0]["tensors"])
        monkeypatch.setattr(positions, "_prepare", lambda *a: pytest.fail("prepared again"))
        assert [t.id for t in tiny_mind.generate("The cat", memory=Memory.load(path), **options).tokens] == first
        copy = Memory.load(path).save(tmp_path / "copy")  # saved elsewhere: the file is copied, checked as read
        assert [t.id for t in tiny_mind.generate("The cat", memory=Memory.load(copy), **options).tokens] == first

        file = copy / json.loads((copy / "manifest.json").read_text())["prepared"][0]["file"]
        data = bytearray(file.read_bytes())
        data[-1] ^= 0xFF  # the last tensor's last byte
        file.write_bytes(bytes(data))
        with pytest.raises(MemoryFileError, match="checksum"):
            Memory.load(copy).verify()
        monkeypatch.setattr(positions, "_prepare", real_prepare)
        with caplog.at_level("WARNING"):
            again = tiny_mind.generate("The cat", memory=Memory.load(copy), **options)
        assert [t.id for t in again.tokens] == first and "saved prepared keys are unusable" in caplog.text
        file.unlink()
        caplog.clear()
        with caplog.at_level("WARNING"):
            reopened = Memory.load(copy)  # the documents stay readable
        assert not reopened.prepared_keys and "saved prepared keys ignored" in caplog.text
        assert [t.id for t in tiny_mind.generate("The cat", memory=reopened, **options).tokens] == first

        edited = Memory.load(path)
        edited.remove(edited.segments[-1].document.id)
        assert not edited.prepared_keys  # derived from the old documents
        monkeypatch.setenv(prepared.SAVE_ENV, "0")
        fresh = tiny_mind.memorize(DOCS, storage="bfloat16")
        tiny_mind.generate("The cat", memory=fresh, **options)
        assert json.loads((fresh.save(tmp_path / "off") / "manifest.json").read_text())["prepared"] == []
    finally:
        scan_select.scan_path.cache_clear()


def test_a_large_memorys_calibration_is_kept_and_reused(tiny_mind, tmp_path, monkeypatch):
    """The relevance calibration of a large saved memory is computed once, kept in the cache and read by later
    processes (here: later loads) instead of 144 selection passes; a damaged or foreign one is computed again."""
    from extended_mind import Memory
    from extended_mind.engine import prepared, reading

    monkeypatch.setattr(prepared, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(prepared, "PERSIST_MIN", 0)
    calibrated = []
    real = reading.calibrate_relevance
    monkeypatch.setattr(reading, "calibrate_relevance", lambda *a: calibrated.append(1) or real(*a))
    path = tiny_mind.memorize(DOCS).save(tmp_path / "m")
    options = dict(max_new_tokens=3, blocks=2, block_size=8, chat=False)
    first = tiny_mind.generate("The cat", memory=Memory.load(path), **options)
    kept = list((tmp_path / "cache" / "prepared" / "calibrations").glob("*.json"))
    assert calibrated == [1] and len(kept) == 1
    again = tiny_mind.generate("The cat", memory=Memory.load(path), **options)
    ids = [t.id for t in first.tokens]
    assert calibrated == [1] and [t.id for t in again.tokens] == ids  # read from the cache: not calibrated again
    kept[0].write_text("{not json")
    assert [t.id for t in tiny_mind.generate("The cat", memory=Memory.load(path), **options).tokens] == ids
    assert calibrated == [1, 1]  # unreadable: calibrated again (and kept again)
    tiny_mind.generate("The cat", memory=Memory.load(path), block_size=16, max_new_tokens=1, chat=False)
    assert calibrated == [1, 1, 1]  # another setting is another calibration
    monkeypatch.setenv(prepared.KEEP_ENV, "0")
    tiny_mind.generate("The cat", memory=Memory.load(path), **options)
    assert calibrated == [1, 1, 1, 1]  # nothing kept is read when the cache is turned off


def test_the_calibration_is_saved_with_the_memory(tiny_mind, tmp_path, monkeypatch, caplog):
    """`calibrate` computes the relevance calibration now; a save writes it into the manifest and a load reads it
    back (in any process: the cache is off here), so no question calibrates again; editing the documents drops it,
    and a damaged one is computed again with a warning."""
    from extended_mind import Memory
    from extended_mind.engine import prepared, reading

    monkeypatch.setenv(prepared.KEEP_ENV, "0")  # the cache keeps nothing: only the memory can hold it
    calibrated = []
    real = reading.calibrate_relevance
    monkeypatch.setattr(reading, "calibrate_relevance", lambda *a: calibrated.append(1) or real(*a))
    options = dict(max_new_tokens=3, blocks=2, block_size=8)
    memory = tiny_mind.calibrate(tiny_mind.memorize(DOCS), block_size=8)
    assert calibrated == [1] and len(memory.calibrations) == 1
    path = memory.save(tmp_path / "m")
    first = tiny_mind.generate("The cat", memory=memory, chat=False, **options)
    loaded = Memory.load(path)
    assert loaded.calibrations == memory.calibrations
    again = tiny_mind.generate("The cat", memory=loaded, chat=False, **options)
    assert calibrated == [1] and [t.id for t in again.tokens] == [t.id for t in first.tokens]
    tiny_mind.generate("The cat", memory=loaded, chat=True, **options)  # the same calibration serves every form
    assert calibrated == [1]
    tiny_mind.add(loaded, ["A new document about boats and the sea."], ids=["new"])
    assert loaded.calibrations == {}  # about the old documents
    tiny_mind.generate("The cat", memory=loaded, chat=False, **options)
    assert calibrated == [1, 1]
    manifest = json.loads((path / "manifest.json").read_text())
    key = next(iter(manifest["calibrations"]))
    manifest["calibrations"][key]["spread"][0] = -1.0
    (path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        damaged = tiny_mind.generate("The cat", memory=Memory.load(path), chat=False, **options)
    assert calibrated == [1, 1, 1] and "calibrating again" in caplog.text
    assert [t.id for t in damaged.tokens] == [t.id for t in first.tokens]
    manifest["calibrations"] = ["not", "a", "table"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        mangled = Memory.load(path)  # derived data: the documents stay readable
    assert mangled.calibrations == {} and "malformed" in caplog.text


def test_embedding_choice_reads_the_blocks_nearest_the_question(tiny_mind):
    tiny_mind.embedder = WordEmbedder()
    docs = ["Apples pears plums grow in orchards. " * 2, "Ships sail from harbours at dawn. " * 2,
            "Bread rises in warm ovens overnight. " * 2]  # fmt: skip
    memory = tiny_mind.memorize(docs, ids=["fruit", "ships", "bread"])
    options = dict(memory=memory, chat=False, max_new_tokens=4, block_size=128, blocks=1, block_choice="embedding")
    for question, doc in [("Where do ships sail from?", "ships"), ("What rises in ovens?", "bread")]:
        result = tiny_mind.generate(question, **options)
        assert result.blocks_read == 1  # always the nearest block: no relevance test
        assert result.citations and {c.doc for c in result.citations} == {doc}
    # the block vectors are computed once per memory and block size
    cached = [k for k in memory._flat if k.startswith("embeddings-128")]
    assert len(cached) == 1
    batch = tiny_mind.generate_batch(["Where do ships sail from?", "What rises in ovens?"], [memory, memory],
                                     **{k: v for k, v in options.items() if k != "memory"})  # fmt: skip
    single = [tiny_mind.generate(q, **options) for q in ("Where do ships sail from?", "What rises in ovens?")]
    assert [[t.id for t in r.tokens] for r in batch] == [[t.id for t in r.tokens] for r in single]
    assert [{c.doc for c in r.citations} for r in batch] == [{"ships"}, {"bread"}]


def test_block_choice_is_checked_and_a_missing_embedding_model_is_named(tiny_mind, tmp_path, monkeypatch):
    from extended_mind.base.errors import ExtendedMindError, ModelLoadError
    from extended_mind.retrieval.embedding import Embedder

    memory = tiny_mind.memorize(DOCS)
    with pytest.raises(ExtendedMindError, match="unknown block_choice 'nearest'"):
        tiny_mind.generate("Where?", memory=memory, block_choice="nearest")
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="extended-mind data fetch --only minilm"):
        Embedder()


def test_block_memory_cites_without_every_documents_spans(tiny_mind, tmp_path, monkeypatch):
    """A read block's text and its citations read the spans of their own documents only (the flat view of every
    document's spans cost a cold million-token memory 1.5 s of its first question)."""
    docs = ["The keeper of the lighthouse is Ada. " * 4, "Bread is baked at dawn. " * 4, "Snow fell. " * 6]
    tiny_mind.memorize(docs, ids=["a", "b", "c"], progress=False).save(tmp_path / "m")
    memory = Memory.load(tmp_path / "m")

    def refuse(self):
        raise AssertionError("read every document's spans")

    monkeypatch.setattr(Memory, "token_spans", property(refuse))
    result = tiny_mind.generate("Who keeps the light?", memory=memory, chat=False, max_new_tokens=3, blocks=2,
                                block_size=16, block_relevance=0.0)  # fmt: skip
    assert result.blocks_read and result.citations and result.passages
    for c in result.citations + result.passages:
        assert c.text.strip() in docs["abc".index(c.doc)]


def test_block_memory_never_reads_the_stored_positions(tiny_mind, monkeypatch):
    """Block memory rotates slots to their own positions; the stored ones are read by token retrieval only (a cold
    million-token memory reads them from every document's file: 1.1 s of its first question)."""
    memory = tiny_mind.memorize(["The keeper of the lighthouse is Ada. " * 4, "Bread is baked at dawn. " * 4],
                                progress=False)  # fmt: skip

    def refuse(self):
        raise AssertionError("block memory read the stored positions")

    monkeypatch.setattr(Memory, "positions", property(refuse))
    result = tiny_mind.generate("Who keeps the light?", memory=memory, chat=False, max_new_tokens=3, blocks=2,
                                block_size=16, block_relevance=0.0)  # fmt: skip
    assert result.blocks_read and result.citations
