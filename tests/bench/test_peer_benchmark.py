"""benchmarks/peer_llamacpp.py's own arithmetic (the llama.cpp side needs `make peer`; it is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from extended_mind.base.weights import int4_decode_available, use_decode_weights
from tests.conftest import byte_tokenizer, tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_llamacpp.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rates_are_prompt_over_first_token_and_median_interval(peer):
    r = peer.rates([1.5, 1.6, 1.8, 1.9], start=0.5, prompt_tokens=500)
    assert r["prefill_tok_s"] == pytest.approx(500.0)
    assert r["decode_ms"] == pytest.approx(100.0)  # intervals 0.1, 0.2, 0.1: median 0.1 s
    assert r["decode_tok_s"] == pytest.approx(10.0)


def test_weight_bytes_count_the_output_layer_once_and_skip_an_untied_embedding_table(peer):
    model = tiny_model("llama")
    params = {id(p): p for p in model.parameters()}
    table = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is table
    expected = sum(p.numel() * p.element_size() for p in params.values() if tied or p is not table)
    assert peer.weight_bytes(model) == expected
    half = tiny_model("llama").to(torch.bfloat16)
    assert peer.weight_bytes(half) * 2 == expected
    int8 = tiny_model("llama")
    use_decode_weights(int8, "int8")  # decode steps read one byte per weight of each linear layer, plus its scales
    linears = [m for m in int8.modules() if hasattr(m, "int8_codes")]
    read = expected - sum(m.weight.numel() * 4 - m.weight.numel() - 2 * m.out_features for m in linears)
    assert peer.weight_bytes(int8) == read
    if int4_decode_available():  # half a byte per weight, a bfloat16 scale and zero per 32 (the head too)
        int4 = tiny_model("llama")
        use_decode_weights(int4, "int4")
        fours = [m for m in int4.modules() if hasattr(m, "int4_packed")]
        assert fours
        n = [(m.weight.numel(), m.out_features) for m in fours]
        saved = sum(size + 2 * out - size // 2 - size // 32 * 4 for size, out in n)  # int8's bytes minus int4's
        assert peer.weight_bytes(int4) == read - saved


def test_prompt_ids_have_the_asked_length(peer):
    ids = peer.prompt_ids(byte_tokenizer(), 5000)
    assert len(ids) == 5000


def test_the_table_names_the_cpu_and_each_row(peer):
    row = {"engine": "llama.cpp", "weights": "GGUF (x.gguf)", "threads": 2, "prefill_tok_s": 240.0,
           "decode_tok_s": 86.0, "decode_ms": 11.6, "weight_bytes": 98_000_000, "same_tokens": "10/64"}  # fmt: skip
    results = {"cpu": {"model": "AMD EPYC", "flags": ["avx2"]}, "torch": "2.13", "llama_cpp": "0.3.36",
               "prompt_tokens": 500, "new_tokens": 64, "repeats": 3, "rows": [row]}  # fmt: skip
    table = peer.markdown(results)
    assert "CPU: AMD EPYC; flags: avx2" in table
    assert "| llama.cpp | GGUF (x.gguf) | 2 | 240 | 86.0 | 11.6 | 98 | 8.4 | 10/64 |" in table
