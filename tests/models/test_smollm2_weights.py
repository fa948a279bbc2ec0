"""SmolLM2 with int8 and int4 decode weights (what dtype="auto" chooses on CPUs where one decodes fastest and agrees
with float32): the counterfactual article and the passkey are answered and cited as in float32."""

from __future__ import annotations

from importlib.resources import files

import pytest

from extended_mind import ExtendedMind
from extended_mind.base.weights import decode_weights_available
from tests.models.test_smollm2_memory import FILLER, PASSKEY, TERMITES, passkey


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_smollm2_decode_weights_answer_and_cite_like_float32(smol, kind):
    if smol.device.type != "cpu" or not decode_weights_available(kind):
        pytest.skip(f"{kind} decode weights are a CPU precision of torch's {kind} weight-only kernel")
    quantized = ExtendedMind.from_pretrained(device="cpu", dtype=kind)
    assert quantized.weights == kind and smol.weights == "float32"
    article = (files("extended_mind") / "data" / "aardwolf.txt").read_text()  # edited: 80,000 termites a night
    docs = [article, FILLER * 60 + PASSKEY + FILLER * 60]
    memory = quantized.memorize(docs, ids=["aardwolf", "passkey"])  # memorized with the float32 weights (many rows)
    reference = smol.memorize(docs, ids=["aardwolf", "passkey"])
    assert all((a - b).abs().max() == 0 for a, b in zip(memory.keys, reference.keys))
    for mind, mem in ((quantized, memory), (smol, reference)):
        fact = mind.generate(TERMITES, memory=mem, chat=False, max_new_tokens=12, stop=["\n"])
        assert "80,000" in fact.text and "80,000" in fact.citations[0].text, (mind.weights, fact.text)
        key = passkey(mind, mem)
        assert "61734" in key.text and key.citations[0].doc == "passkey", (mind.weights, key.text)
    chat = quantized.generate("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in chat.text
