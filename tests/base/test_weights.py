"""Weight precision: int8 decode weights (decode steps through torch's packed int8 kernel, prompts and large batches
through the float32 weights, the model's parameters and identity unchanged), and the measured choice behind
dtype="auto" (cached per CPU, threads and model; an explicit dtype wins)."""

from __future__ import annotations

import json

import pytest
import torch

from extended_mind import ExtendedMind
from extended_mind.base import weights
from extended_mind.base.errors import ModelLoadError
from extended_mind.base.identity import ModelIdentity
from extended_mind.base.loading import load_model
from tests.conftest import byte_tokenizer, tiny_model

pytestmark = pytest.mark.skipif(not weights.int8_decode_available(), reason="no int8 weight-only kernel in torch")


def test_int8_decode_weights_serve_few_rows_and_leave_the_rest_float32():
    model = tiny_model("llama")
    reference = tiny_model("llama")  # same seed, same weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = ModelIdentity.of(model, byte_tokenizer(), "tiny")
    converted = weights.use_int8_decode(model)
    assert converted == sum(type(m) is torch.nn.Linear for m in reference.modules())  # every in_features % 16 == 0
    assert model.state_dict().keys() == state.keys()  # codes are not parameters: saved models are unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert ModelIdentity.of(model, byte_tokenizer(), "tiny") == before  # memories made before still load
    torch.manual_seed(0)
    steps = torch.randint(0, 256, (weights.DECODE_ROWS, 1))  # a decode step of a full batch: one token per row
    prompt, big_batch = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (weights.DECODE_ROWS + 1, 1))
    with torch.inference_mode():
        for ids in (prompt, big_batch):  # prompts and large batches: the float32 weights, bit for bit
            assert torch.equal(model(ids).logits, reference(ids).logits)
        got, expected = model(steps).logits, reference(steps).logits
    assert not torch.equal(got, expected)  # the int8 path ran
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # per-channel int8: close to float32
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8  # a random model has near-ties
    weights.drop_int8_decode(model)
    with torch.inference_mode():
        assert torch.equal(model(steps).logits, reference(steps).logits)


def test_layers_the_kernel_cannot_take_stay_float():
    layer = torch.nn.Linear(24, 8)  # in_features not a multiple of 16: the kernel's results would be wrong
    model = torch.nn.Sequential(layer, torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    assert weights.use_int8_decode(model) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "Int8DecodeLinear"]


def test_auto_measures_once_then_reads_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    choice = weights.choose(model, tokenizer)
    assert choice in weights.WEIGHTS
    found = next(iter(json.loads((tmp_path / "weights-choice.json").read_text()).values()))
    assert found["choice"] == choice and found["float32"]["decode_ms"] > 0
    assert 0.0 <= found["int8"]["agreement"] <= 1.0 and isinstance(found["int8"]["counts"], bool)
    assert all(type(m) is not weights.Int8DecodeLinear for m in model.modules())  # measuring left it as it was

    def no_measuring(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(weights, "measure", no_measuring)
    assert weights.choose(model, tokenizer) == choice


def test_loading_with_a_named_precision(tmp_path, monkeypatch):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    mind = ExtendedMind.from_pretrained(str(path), device="cpu", dtype="int8")  # (int8 is refused on a GPU)
    assert mind.weights == "int8" and mind.model.dtype == torch.float32
    both = ExtendedMind.from_pretrained(str(path), device="cpu", dtype="bfloat16-int8")
    assert both.weights == "bfloat16-int8" and both.model.dtype == torch.bfloat16
    assert any(type(m) is weights.Int8DecodeLinear for m in both.model.modules())
    memory = mind.memorize("The keeper of the lighthouse is Ada. " * 4)
    assert mind.generate("Who keeps the light?", memory=memory, max_new_tokens=4, chat=False).tokens
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EXTENDED_MIND_DTYPE")  # the default: auto
    auto = ExtendedMind.from_pretrained(str(path), device="cpu")
    assert auto.weights in weights.WEIGHTS and (tmp_path / "cache" / "weights-choice.json").is_file()
    assert ExtendedMind.from_pretrained(str(path), device="cpu", dtype="float32").weights == "float32"  # explicit
    with pytest.raises(ModelLoadError, match="auto"):
        load_model(str(path), dtype="int4")


def test_int8_is_chosen_only_when_it_agrees_with_float32_and_decodes_faster(monkeypatch):
    """Timings and answers faked: the rule alone."""
    fake = {"float32": (0.060, 1), "int8": (0.022, 1)}

    def fake_probe(model, prompts, forced):
        int8 = any(type(m) is weights.Int8DecodeLinear for m in model.modules())
        decode_s, token = fake["int8" if int8 else "float32"]
        return {"answers": [[token] * weights.PROBE_TOKENS for _ in prompts], "decode_s": decode_s}

    monkeypatch.setattr(weights, "_probe", fake_probe)
    found = weights.measure(tiny_model("llama"), byte_tokenizer())
    assert found["choice"] == "int8" and found["int8"]["agreement"] == 1.0
    fake["int8"] = (0.022, 2)  # never float32's token
    assert weights.measure(tiny_model("llama"), byte_tokenizer())["choice"] == "float32"
    fake["int8"] = (0.059, 1)  # agrees, but no faster than float32 (beyond MIN_GAIN)
    assert weights.measure(tiny_model("llama"), byte_tokenizer())["choice"] == "float32"
