"""SmolLM2 with approximate search (IVF over int8 keys, re-ranked exactly): the counterfactual article and a passkey are
answered and cited as with exact search, including after the index was saved with the memory and loaded."""

from __future__ import annotations

from importlib.resources import files

from extended_mind.retrieval.index import LayerIndex
from tests.models.test_smollm2_memory import FILLER, PASSKEY, TERMITES, passkey


def test_smollm2_approximate_search_answers_like_exact_search(smol, tmp_path, monkeypatch):
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()  # edited: 80,000 termites a night
    memory = smol.memorize([article, FILLER * 150 + PASSKEY + FILLER * 150], ids=["aardwolf", "passkey"])
    smol.build_index(memory).save(tmp_path / "m")
    loaded = smol.load_memory(tmp_path / "m")
    monkeypatch.setattr(LayerIndex, "build", None)  # the saved index must be used, not rebuilt
    answers = {}
    for search in ("exact", "approximate"):
        fact = smol.generate(TERMITES, memory=loaded, chat=False, max_new_tokens=12, stop=["\n"], search=search)
        key = passkey(smol, loaded, search=search)
        answers[search] = (fact.text, key.text)
        assert "80,000" in fact.text and "80,000" in fact.citations[0].text, (search, fact.text)
        assert "61734" in key.text and key.citations[0].doc == "passkey", (search, key.text)
    assert answers["approximate"] == answers["exact"]
