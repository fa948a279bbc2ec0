"""The evaluation harness: scorers, generators, counterfactual items, method specs, YaRN, RAG ranking, data loading
from fixtures, and one end-to-end bench (with resume) on a tiny model. No data is fetched here."""

from __future__ import annotations

import bz2
import json
import random
import zlib

import pytest
import torch

from extended_mind.base.errors import ExtendedMindError
from extended_mind.bench import data, icl, synthetic, wikiqa
from extended_mind.bench.cli import parse_grid
from extended_mind.bench.items import Item, first_integer, mentions, normalize, score_fraction
from extended_mind.bench.methods import PREAMBLE_TOKENS, Harness, parse_method, prompt_text
from extended_mind.bench.rag import Retriever
from extended_mind.bench.report import markdown_table
from extended_mind.bench.runner import run_task
from extended_mind.bench.tasks import TaskSpec
from extended_mind.bench.yarn import yarn_factor, yarn_scaling
from tests.conftest import WordEmbedder


def words(text: str) -> int:
    return len(text.split())


# ---- scorers ----


@pytest.mark.parametrize(
    "text,expected",
    [
        (" 29206. Remember it", 29206),
        ("The key is 12,345.", 12345),
        ("version v2 then 42", 42),
        ("the 42nd street, then 7", 7),
        ("pi is 3.14 and 8", 8),
        ("no digits here", None),
        ("", None),
        ("(1861)", 1861),
    ],
)
def test_first_integer(text, expected):
    assert first_integer(text) == expected


def test_mentions_normalizes_punctuation_and_respects_word_boundaries():
    assert normalize("St. Louis,  MO!") == "st louis mo"
    assert mentions("He moved to st louis in", "St. Louis")
    assert mentions("born in the U.S.A. in 1809", "U.S.A.")
    assert not mentions("a battery 18650 cell", "1865")
    assert not mentions("cattle", "cat")
    assert not mentions("", "1865")
    assert not mentions("anything", "")


def test_item_scorers():
    passkey = Item("passkey", "p", 10, "doc", "q", "p", ["512"], "first_integer", 8)
    assert passkey.score(" 512.") == 1.0
    assert passkey.score(" 5120") == 0.0
    assert passkey.score("") == 0.0
    niah = Item("niah", "n", 10, "doc", "q", "p", ["sandwich", "dolores park"], "any", 8)
    assert niah.score("eat a Sandwich.") == 1.0
    assert niah.score("sandwiches") == 0.0
    assert score_fraction("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert score_fraction("", ["1"]) == 0.0
    assert "document" not in passkey.record()


# ---- generated tasks ----


def test_passkey_item_has_the_key_at_its_depth_and_about_the_length():
    item = synthetic.passkey(2000, 0.25, random.Random(3), words)
    key = item.answers[0]
    assert f"The pass key is {key}." in item.document
    assert abs(words(item.document) - 2000) < 30
    at = item.document.index("The pass key is") / len(item.document)
    assert abs(at - 0.25) < 0.03
    again = synthetic.passkey(2000, 0.25, random.Random(3), words)
    assert again.document == item.document  # deterministic in the seed


@pytest.mark.parametrize("kind", synthetic.RULER_TASKS)
def test_ruler_items_hold_every_answer(kind):
    hay = "Some essay text goes here. It has sentences! Does it ask questions? Yes it does. " * 50
    item = synthetic.ruler(kind, 1500, random.Random(0), words, hay, ["apple", "river", "stone"], ["red", "big"])
    assert item.answers and all(a in item.document for a in item.answers)
    assert item.score(" ".join(item.answers)) == 1.0
    assert item.score("") == 0.0
    if kind == "variable_tracking":
        first = item.document.index(f"VAR {item.answers[0]} =")
        assert all(item.document.index(f"VAR {a} =") >= first for a in item.answers)
    if kind == "niah_multikey":
        assert item.document.count("special magic numbers for") == 4


def test_unknown_ruler_task_is_refused():
    with pytest.raises(ValueError, match="unknown RULER task"):
        synthetic.ruler("cwe", 100, random.Random(0), words, "A b. C d.", ["x", "z"], ["y", "w"])
    with pytest.raises(ValueError, match="at least 4"):
        synthetic.ruler("niah_single", 100, random.Random(0), words, "A b. C d.", ["x"], ["y"])


def test_needles_are_placed_between_sentences():
    text = synthetic.place(["A.", "B.", "C.", "D."], [(0.5, "N1."), (1.0, "N2."), (0.0, "N0.")])
    assert text == "N0. A. B. N1. C. D. N2."


# ---- counterfactual Wikipedia QA ----

ARTICLES = [
    data.Article(
        "Testland",
        "Testland is a small imaginary country used for tests of the harness. "
        "The kingdom of testland was founded by the first king of the old dynasty in 1723 after a long war. "
        "Its capital city was moved to the coast by a decree of the national parliament in 1851, after floods. "
        "Its people call it home.",
    ),
    data.Article("Other", "An unrelated article about rivers and mountains with no dates at all. " * 40),
    data.Article("Dated", "A third article that mentions the year 1730 in passing. " * 5),
]


def test_counterfactual_questions_are_verified_edits():
    qs = wikiqa.questions(ARTICLES, seed=1)
    assert {q.year for q in qs} == {"1723", "1851"}
    for q in qs:
        original = ARTICLES[0].text.lower()
        assert q.year in original and q.counterfactual not in original
        assert 3 <= abs(int(q.counterfactual) - int(q.year)) <= 40
        edited = wikiqa.edit(original, q.year, q.counterfactual)
        assert q.year not in edited and q.counterfactual in edited
        assert edited.count(q.prefix) == 1
        assert edited[q.position : q.position + 4] == q.counterfactual


def test_edit_replaces_whole_numbers_only():
    assert wikiqa.edit("in 1723, not 17235 or 11723.", "1723", "1750") == "in 1750, not 17235 or 11723."


@pytest.mark.parametrize("length", [60, 400])
def test_wikiqa_items_are_cut_or_padded_to_length(length):
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    for q in wikiqa.questions(ARTICLES, seed=1):
        item = wikiqa.item(q, ARTICLES, length * 4, random.Random(0), encode, decode)
        assert abs(len(item.document) - length * 4) <= 8
        assert q.prefix in item.document and q.counterfactual in item.document
        assert q.year not in item.document
        if length == 400:  # padded, and only with articles that mention neither year
            edited = wikiqa.edit(ARTICLES[0].text.lower(), q.year, q.counterfactual)
            assert edited in item.document and "rivers and mountains" in item.document
            assert item.document.count(q.counterfactual) == edited.count(q.counterfactual)
        assert item.score(f"{q.prefix} {q.counterfactual}.") == 1.0
        assert item.score(f"{q.prefix} {q.year}.") == 0.0


def test_spread_takes_one_question_per_article_in_turn():
    qs = [wikiqa.Question(a, str(1900 + i), "1950", "p", 0) for a in "AB" for i in range(3)]
    assert [q.article for q in wikiqa.spread(qs, 4)] == ["A", "B", "A", "B"]


# ---- data: wiki markup and loading from a fixture ----


def test_strip_wikitext():
    raw = (
        "{{Infobox person|name=X|birth={{date|1900}}}}'''Ada''' was a [[mathematician|maths person]] "
        "born in [[London]].<ref>{{cite book|title=Y}}</ref> [[File:Ada.jpg|thumb|A [[portrait]]]]\n"
        "== Life ==\n* She wrote <!-- hidden --> notes.\n{| class=wikitable\n| a || b\n|}\n[[Category:People]]"
    )
    text = data.strip_wikitext(raw)
    assert text == "Ada was a maths person born in London.\nLife.\nShe wrote notes."


def _fixture_root(tmp_path):
    root = tmp_path / "data"
    wiki = root / "wikipedia"
    wiki.mkdir(parents=True)
    page = "<page><title>{t}</title><revision><text>{x}</text></revision></page>"
    pages = [page.format(t="Good", x="Plain words. " * 200), page.format(t="Stub", x="Too short."),
             page.format(t="Redir", x="#REDIRECT [[Good]]"), page.format(t="Talk:Good", x="talk " * 400)]  # fmt: skip
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{"".join(pages)}</mediawiki>'
    (wiki / data.WIKI_MEMBER.rsplit("/", 1)[1]).write_bytes(bz2.compress(xml.encode()))
    (wiki / ".complete").write_text("fixture")
    return root


def test_wikipedia_loader_keeps_real_articles_only(tmp_path):
    articles = data.wikipedia(_fixture_root(tmp_path))
    assert [a.title for a in articles] == ["Good"]


def test_missing_data_names_the_fix(tmp_path):
    with pytest.raises(data.DataMissingError, match="extended-mind data fetch"):
        data.essays(tmp_path / "nothing")
    with pytest.raises(ExtendedMindError, match="unknown data source"):
        data.fetch(["nope"], root=tmp_path)


# ---- methods ----


def test_method_specs():
    spec = parse_method("emt[topk=20,similarity_threshold=0.25,position_policy=zero]")
    assert spec.name == "emt" and spec.settings == {"topk": 20, "similarity_threshold": 0.25, "position_policy": "zero"}
    assert spec.label == "emt[position_policy=zero,similarity_threshold=0.25,topk=20]"
    assert parse_method("emt[uncertainty_threshold=none]").settings == {"uncertainty_threshold": None}
    assert parse_method("emt+rag[top=3]").settings == {"top": 3}
    assert parse_method("emt[layers=10-29]").settings == {"layers": "10-29"}
    with pytest.raises(ExtendedMindError, match="layers look like FIRST-LAST"):
        parse_method("emt[layers=ten-29]")
    for bad, message in [("bm25", "unknown method"), ("rag[topk=3]", "no setting"), ("emt[topk=ten]", "must be int")]:
        with pytest.raises(ExtendedMindError, match=message):
            parse_method(bad)
    assert parse_grid(["topk=5,10", "ranking=logit,cosine"]) == [
        "emt[topk=5,ranking=logit]", "emt[topk=5,ranking=cosine]", "emt[topk=10,ranking=logit]",
        "emt[topk=10,ranking=cosine]",
    ]  # fmt: skip
    with pytest.raises(ExtendedMindError):
        parse_grid(["window=1,2"])


def test_prompt_template_is_shared():
    item = Item("t", "i", 10, "doc", "What is it?", "It is", ["x"], "any", 4)
    assert prompt_text(item) == "What is it?\nIt is"
    assert prompt_text(item, " pasted ") == "pasted\n\nWhat is it?\nIt is"


def test_answers_without_their_prefix_get_room_for_a_preamble(tiny_mind):
    item = Item("t", "i", 10, "doc", "What is it?", "It is", ["x"], "any", 4)
    assert Harness(tiny_mind, chat=True).budget(item) == 4
    assert Harness(tiny_mind, chat=True, prefix=False).budget(item) == 4 + PREAMBLE_TOKENS
    assert Harness(tiny_mind, prefix=False).budget(item) == 4 + PREAMBLE_TOKENS
    choice = Item("t", "i", 10, "doc", "What is it?", "Topic:", ["x"], "first_word", 1, meta={"choices": [5, 6]})
    assert Harness(tiny_mind, prefix=False).budget(choice) == 1  # a classification answers in its first token


def test_yarn_factor():
    assert yarn_factor(100, 8192) == 1.0
    assert yarn_factor(8193, 8192) == 1.25
    assert yarn_factor(16384, 8192) == 2.0


def test_yarn_scaling_is_switched_on_and_off(tiny_mind):
    model = tiny_mind.model
    ids = torch.randint(0, 256, (1, 40))
    with torch.inference_mode():
        before = model(ids).logits
        with yarn_scaling(model, 2.0):
            assert model.config.max_position_embeddings == 1024
            scaled = model(ids).logits
        after = model(ids).logits
    assert model.config.max_position_embeddings == 512
    assert not torch.allclose(before, scaled)
    assert torch.equal(before, after)


def test_retriever_returns_the_nearest_chunks_in_document_order(tiny_mind):
    retriever = Retriever(WordEmbedder(), tiny_mind.tokenizer)
    doc = "".join(f"filler {i:03d} text. " for i in range(40)) + "zebra quagga okapi. " + "more filler. " * 20
    chunks = retriever.retrieve(doc, "zebra quagga okapi?", chunk_tokens=40, top=3)
    assert len(chunks) == 3
    assert any("zebra" in c for c in chunks)
    positions = [doc.index(c) for c in chunks]
    assert positions == sorted(positions)
    with pytest.raises(ExtendedMindError):
        retriever.retrieve(doc, "q", chunk_tokens=0)


# ---- end to end ----


def test_bench_end_to_end_on_a_tiny_model_resumes(tiny_mind, tmp_path, monkeypatch):
    harness = Harness(tiny_mind)
    methods = [parse_method(m) for m in ("emt[topk=4]", "context", "yarn", "none")]
    spec = TaskSpec(lengths=[200, 700], n=1, depths=[0.5])
    summary = run_task(harness, "passkey", methods, spec, tmp_path, progress=False)
    records = summary["records"]
    assert len(records) == 8
    assert {r["method"] for r in records} == {"emt[topk=4]", "context", "yarn", "none"}
    long_context = [r for r in records if r["method"] == "context" and r["length"] == 700][0]
    assert long_context["truncated"] is True  # 700 bytes + prompt do not fit the 512-token window
    assert [r for r in records if r["method"] == "yarn" and r["length"] == 700][0]["yarn_factor"] > 1
    assert all(0.0 <= r["score"] <= 1.0 and r["seconds"] > 0 for r in records)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == 8
    assert (tmp_path / "accuracy_vs_length.png").stat().st_size > 1000
    assert "| emt[topk=4] |" in (tmp_path / "table.md").read_text()
    for r in (r for r in records if r["method"] == "emt[topk=4]"):  # a placed fact: was it read, was it cited
        cited = any(a in r.get("top_citation", "").lower() for a in r["answers"])
        assert isinstance(r["answer_read"], bool) and r["answer_cited"] is cited
    assert "the top citation holds the answer in" in (tmp_path / "table.md").read_text()

    # a run killed mid-write leaves a cut line; the rerun keeps the 7 whole records and redoes only the 8th
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    calls = []
    original = Harness.answer
    monkeypatch.setattr(Harness, "answer", lambda self, m, item: calls.append(m.label) or original(self, m, item))
    again = run_task(harness, "passkey", methods, spec, tmp_path, progress=False)
    assert calls == [records[7]["method"]]
    assert len(again["records"]) == 8


def test_perplexity_end_to_end_on_a_tiny_model(tiny_mind, tmp_path, monkeypatch):
    from extended_mind.bench import tasks

    monkeypatch.setattr(tasks, "PERPLEXITY_LOCAL", 64)
    doc = tasks.PerplexityDoc("d", 300, list(range(97, 97 + 26)) * 9, [97 + i % 26 for i in range(64)])
    from extended_mind.bench import runner

    monkeypatch.setattr(runner, "perplexity_docs", lambda spec, tok: [doc])
    methods = [parse_method(m) for m in ("emt", "context", "none", "rag")]
    summary = run_task(Harness(tiny_mind), "perplexity", methods, TaskSpec(lengths=[300]), tmp_path, progress=False)
    by = {r["method"]: r for r in summary["records"]}
    assert set(by) == {"emt", "context", "none"}  # RAG has no question to retrieve for
    assert all(r["tokens"] == 63 and r["perplexity"] > 1 for r in by.values())
    assert "perplexity" in markdown_table(summary)
    assert (tmp_path / "perplexity.png").exists()


def test_bench_cli_refuses_bad_settings_before_loading_a_model(capsys):
    from extended_mind.cli import main

    assert main(["bench", "passkey", "--methods", "emt[topk=many]"]) == 2
    assert "topk of emt must be int" in capsys.readouterr().err
    assert main(["tune", "--grid", "window=1,2"]) == 2
    assert "SETTING=V1,V2" in capsys.readouterr().err
    assert main(["bench", "wikiqa", "--n", "0"]) == 2


def test_a_refused_item_is_recorded_and_the_run_goes_on(tiny_mind, tmp_path, monkeypatch):
    original = Harness.answer

    def refuse_context(self, m, item):
        if m.name == "context":
            raise ExtendedMindError("prompt is too long")
        return original(self, m, item)

    monkeypatch.setattr(Harness, "answer", refuse_context)
    methods = [parse_method(m) for m in ("context", "none")]
    summary = run_task(Harness(tiny_mind), "passkey", methods, TaskSpec(lengths=[100], depths=[0.5]), tmp_path,
                       progress=False)  # fmt: skip
    by = {r["method"]: r for r in summary["records"]}
    assert by["context"]["error"] == "prompt is too long" and by["context"]["score"] == 0.0
    assert "error" not in by["none"]
    assert "1 run(s) refused" in (tmp_path / "table.md").read_text()


# ---- many-shot in-context learning ----


def _topic_articles(k: int = 8, sentences: int = 100) -> tuple[data.Article, ...]:
    return tuple(
        data.Article(f"Topic {c}", " ".join(f"Sentence {i} is about topic {c} and nothing else at all." for i in
                                            range(sentences)))
        for c in range(k)
    )  # fmt: skip


GROUPS = {f"class {g}": (f"Topic {2 * g}", f"Topic {2 * g + 1}") for g in range(4)}


def _one_token_per_word(text: str) -> list[int]:  # every word a token: codes are one token each
    return [zlib.crc32(w.encode()) % 1000 for w in text.split()]  # not hash(): salted per process


def test_icl_items_are_balanced_nested_and_never_show_a_question():
    nouns = [f"code{chr(97 + i)}word" for i in range(26)] + ["lantern", "harbor", "velvet"]
    make = lambda counts, n: icl.icl_items(counts, n, _topic_articles(), nouns, 0, _one_token_per_word, GROUPS)  # noqa: E731
    items = make([8, 64, 320], 20)
    assert [sum(1 for i in items if i.length == n) for n in (8, 64, 320)] == [20, 20, 20]
    questions = [i.question for i in items if i.length == 8]
    assert questions == [i.question for i in items if i.length == 320]  # the same questions for every N
    by_n = {i.length: i.document.split(icl.UNIT_SEPARATOR) for i in items}
    assert {n: len(d) for n, d in by_n.items()} == {8: 8, 64: 64, 320: 320}
    assert set(by_n[8]) <= set(by_n[64]) <= set(by_n[320])  # nested demonstration sets
    assert not any(q.removeprefix("Text: ") in by_n[320][j] for q in questions for j in range(320))
    codes = items[0].meta["codes"]
    assert len(set(codes)) == 4 and len(set(items[0].meta["choices"])) == 4
    shown = [sum(d.endswith(f"Topic: {c}") for d in by_n[64]) for c in codes]
    assert shown == [16] * 4  # balanced over the classes
    first = items[0]
    assert first.score(f" {first.answers[0]}\nText:") == 1.0 and first.score(f"maybe {first.answers[0]}") == 0.0
    with pytest.raises(ValueError, match="at most"):
        make([10_000], 4)
    with pytest.raises(ValueError, match="missing"):
        icl.icl_items([8], 4, _topic_articles(), nouns, 0, _one_token_per_word, {"x": ("Nope",)})


def test_logit_bias_restricts_the_choice(tiny_mind):
    free = tiny_mind.generate("abc", max_new_tokens=3, chat=False)
    allowed = {t: 100.0 for t in (65, 66)}
    forced = tiny_mind.generate("abc", max_new_tokens=3, chat=False, logit_bias=allowed)
    assert all(t.id in allowed for t in forced.tokens)
    assert [t.id for t in free.tokens] != [t.id for t in forced.tokens] or all(t.id in allowed for t in free.tokens)
    for bad in ({10**6: 1.0}, {65: 101.0}, {"x": 1.0}, [65]):
        with pytest.raises(ExtendedMindError, match="logit_bias"):
            tiny_mind.generate("abc", max_new_tokens=1, logit_bias=bad)


def test_rag_retrieves_whole_demonstrations(tiny_mind):
    retriever = Retriever(WordEmbedder(), tiny_mind.tokenizer)
    demos = [f"Text: filler number {i:03d}.\nTopic: x" for i in range(30)] + ["Text: zebra quagga okapi.\nTopic: y"]
    chosen = retriever.retrieve("\n\n".join(demos), "Text: zebra quagga okapi?", top=2, separator="\n\n")
    assert demos[-1] in chosen and all(c in demos for c in chosen)
