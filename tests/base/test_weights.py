"""Weight precision: int8 and int4 decode weights (decode steps through torch's packed kernels, prompts and large
batches through the float32 weights, the model's parameters and identity unchanged), and the measured choice behind
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


def _needs(kind: str) -> None:
    if not weights.decode_weights_available(kind):
        pytest.skip(f"no {kind} weight-only kernel in torch")


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.05), ("int4", 0.25)])
def test_decode_weights_serve_few_rows_and_leave_the_rest_float32(kind, tolerance):
    _needs(kind)
    model = tiny_model("llama")
    reference = tiny_model("llama")  # same seed, same weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = ModelIdentity.of(model, byte_tokenizer(), "tiny")
    converted = weights.use_decode_weights(model, kind)
    assert converted == sum(type(m) is torch.nn.Linear for m in reference.modules())  # every in_features % 16 == 0
    if kind == "int4":  # 4-bit layers, the output layer 4-bit with a float shortlist (its logits choose tokens)
        head = weights.Int8DecodeLinear if model.lm_head.out_features % 16 else weights.Int4ShortlistHead
        assert type(model.lm_head) is head  # (the kernel needs out_features % 16: 260 tokens get int8)
        assert {type(m) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)} == {
            weights.Int4DecodeLinear}
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
    assert not torch.equal(got, expected)  # the quantized path ran
    assert (got - expected).abs().max() < tolerance * expected.abs().max()  # close to float32
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.6  # a random model has near-ties
    weights.drop_decode_weights(model)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.inference_mode():
        assert torch.equal(model(steps).logits, reference(steps).logits)


def test_layers_the_kernel_cannot_take_stay_float():
    layer = torch.nn.Linear(24, 8)  # in_features not a multiple of 16: the kernel's results would be wrong
    model = torch.nn.Sequential(layer, torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    assert weights.use_decode_weights(model, "int8") == 1
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "Int8DecodeLinear"]
    if weights.int4_decode_available():  # int4 needs in_features % 32 and out_features % 16; else int8 if it can
        model = torch.nn.Sequential(layer, torch.nn.Linear(16, 32), torch.nn.Linear(32, 4), torch.nn.Linear(64, 16))
        assert weights.use_decode_weights(model, "int4") == 3
        assert [type(m).__name__ for m in model] == ["Linear", "Int8DecodeLinear", "Int8DecodeLinear",
                                                     "Int4DecodeLinear"]  # fmt: skip


def test_an_int4_output_layer_scores_its_shortlist_with_the_float_weight():
    """The estimate from 4-bit codes only shortlists: the HEAD_SHORTLIST best tokens of each row get the float
    layer's logits, so greedy picks the float layer's token whenever that token is on the shortlist."""
    _needs("int4")
    torch.manual_seed(0)
    vocab, hidden = 1024, 64
    head = torch.nn.Linear(hidden, vocab, bias=False)
    exact_layer = torch.nn.Linear(hidden, vocab, bias=False)
    exact_layer.weight.data.copy_(head.weight.data)
    assert weights.use_decode_weights(torch.nn.Sequential(head), "int4") == 1
    head.__class__ = torch.nn.Linear  # a layer is the output layer only when the model says so
    weights._give_int4_head(head)
    rows = torch.randn(weights.DECODE_ROWS, 1, hidden)
    with torch.inference_mode():
        got, exact = head(rows)[:, 0], exact_layer(rows)[:, 0]
        estimate = weights.Int4DecodeLinear._multiply(head, rows[:, 0].bfloat16()).float()
    last = estimate.topk(weights.HEAD_SHORTLIST, dim=-1).values[:, -1:]  # (bfloat16 estimates tie at the edge)
    inside, outside = estimate > last, estimate < last
    assert torch.allclose(got[inside], exact[inside], rtol=1e-5, atol=1e-5)
    lowest = torch.where(inside, got, torch.inf).amin(-1, keepdim=True)
    capped = torch.minimum(estimate, lowest).expand_as(got)
    assert torch.all(got[outside] <= capped[outside])  # the estimate, never above the shortlist
    assert (got[outside] == estimate[outside]).float().mean() > 0.9
    assert not torch.allclose(got[outside], exact[outside])
    assert (got[outside] - exact[outside]).abs().max() < 0.25 * exact.abs().max()
    assert torch.equal(got.argmax(-1), exact.argmax(-1))  # float's best is on every row's shortlist here


def test_int4_gives_a_q4_1_layer_its_own_codes_back():
    """Weights that are llama.cpp Q4_1 blocks (per 32 inputs: codes 0-15, min and max present, scale and min
    exact in bfloat16), as the default GGUF's layers load: the 4-bit decode weights hold those same codes and
    scales; only the kernel's zero point (min + 8 scales, code 8 being its zero) is rounded to bfloat16."""
    _needs("int4")
    torch.manual_seed(0)
    out, inputs = 32, 64
    codes = torch.randint(0, 16, (out, inputs // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 puts the group's min at code 0 and its max at 15
    scale = (torch.rand(out, inputs // 32, 1) * 0.02 + 0.001).bfloat16().float()
    low = (torch.randn(out, inputs // 32, 1) * 0.05).bfloat16().float()
    w = (codes * scale + low).reshape(out, inputs)
    layer = torch.nn.Linear(inputs, out, bias=False)
    layer.weight.data.copy_(w)
    assert weights.use_decode_weights(torch.nn.Sequential(layer), "int4") == 1
    eye = torch.eye(inputs, dtype=torch.bfloat16)
    with torch.inference_mode():  # one-hot decode rows read the weights back, one input at a time
        got = torch.cat([layer(eye[i : i + 16].float()) for i in range(0, inputs, 16)]).t()
    zero = (low + 8 * scale).bfloat16().float()
    expected = ((codes - 8) * scale + zero).reshape(out, inputs).bfloat16().float()
    assert torch.equal(got, expected)  # a code one off would be a whole scale away
    assert (got - w).abs().max() <= 0.01 * w.abs().max()


def test_auto_measures_once_then_reads_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTENDED_MIND_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    choice = weights.choose(model, tokenizer)
    assert choice in weights.WEIGHTS
    found = next(iter(json.loads((tmp_path / "weights-choice.json").read_text()).values()))
    assert found["choice"] == choice and found["float32"]["decode_ms"] > 0
    for kind in weights.WEIGHTS[1:]:
        if weights.decode_weights_available(kind):
            assert 0.0 <= found[kind]["agreement"] <= 1.0 and isinstance(found[kind]["counts"], bool)
    assert not any(isinstance(m, weights.DecodeLinear) for m in model.modules())  # measuring left it as it was

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
    if weights.int4_decode_available():
        four = ExtendedMind.from_pretrained(str(path), device="cpu", dtype="int4")
        assert four.weights == "int4" and four.model.dtype == torch.float32
        assert any(type(m) is weights.Int4DecodeLinear for m in four.model.modules())
        assert four.generate("Who keeps the light?", memory=memory, max_new_tokens=4, chat=False).tokens
    with pytest.raises(ModelLoadError, match="auto"):
        load_model(str(path), dtype="int3")


def test_the_fastest_precision_that_agrees_with_float32_is_chosen(monkeypatch):
    """Timings and answers faked: the rule alone."""
    fake = {"float32": (0.060, 1), "int8": (0.022, 1), "int4": (0.015, 2)}
    monkeypatch.setattr(weights, "decode_weights_available", lambda kind: True)

    def fake_probe(model, prompts, forced):
        kinds = {type(m) for m in model.modules()}
        four, eight = weights.Int4DecodeLinear in kinds, weights.Int8DecodeLinear in kinds
        decode_s, token = fake["int4" if four else "int8" if eight else "float32"]
        return {"answers": [[token] * weights.PROBE_TOKENS for _ in prompts], "decode_s": decode_s}

    monkeypatch.setattr(weights, "_probe", fake_probe)
    monkeypatch.setattr(weights, "_give_int4", lambda module: setattr(module, "__class__", weights.Int4DecodeLinear))
    found = weights.measure(tiny_model("llama"), byte_tokenizer())
    assert found["choice"] == "int8" and found["int8"]["agreement"] == 1.0  # int4 faster, but never float32's token
    assert found["int4"]["agreement"] == 0.0 and not found["int4"]["counts"]
    fake["int4"] = (0.015, 1)  # agrees and is fastest
    assert weights.measure(tiny_model("llama"), byte_tokenizer())["choice"] == "int4"
    fake["int4"] = (0.030, 1)  # agrees, slower than int8
    assert weights.measure(tiny_model("llama"), byte_tokenizer())["choice"] == "int8"
    fake["int8"] = (0.022, 2)  # never float32's token
    fake["int4"] = (0.059, 1)  # agrees, but no faster than float32 (beyond MIN_GAIN)
    assert weights.measure(tiny_model("llama"), byte_tokenizer())["choice"] == "float32"
