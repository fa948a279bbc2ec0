"""The native decode step (engine/fast_step.py, kernels/decode_step.cpp): the eager forward's logits and cache for
every family and weight precision it takes, the same answers and citations with block memory, and the eager
forward wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

from extended_mind import ExtendedMind
from extended_mind.attention import slot_step
from extended_mind.attention.session import Session
from extended_mind.base import kv_cache, weights
from extended_mind.base.compat import with_cache
from extended_mind.base.kv_cache import new_cache
from extended_mind.engine import fast_step
from extended_mind.engine.fast_step import FastStep, unsupported
from extended_mind.retrieval.native import NATIVE_ENV, decode_kernel
from tests.conftest import byte_tokenizer, tiny_model

PROMPT = "The sea and the ships that sail on it"
PRECISIONS = ("float32", "int8", "int4")


def _kernel():
    kernel = decode_kernel()
    if kernel is None:
        pytest.skip("the native step cannot be built here (no C++ compiler)")
    return kernel


def _model(family: str, precision: str):
    model = tiny_model(family)
    if precision != "float32":
        if not weights.decode_weights_available(precision):
            pytest.skip(f"torch's {precision} kernel is not available here")
        weights.use_decode_weights(model, precision)
    ExtendedMind(model, byte_tokenizer(), f"tiny-{family}")  # patched, as every model that generates is
    return model


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", fast_step.FAMILIES)
def test_the_native_step_gives_the_eager_logits_and_cache(family, precision, monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_ROOM", 2)  # buffers fill up within the test: the step makes room
    model = _model(family, precision)
    assert unsupported(model) is None
    step = FastStep(model, _kernel())
    prompt = torch.tensor([list(PROMPT.encode())])
    native, eager = new_cache(model.config), new_cache(model.config)
    token = 7
    with torch.inference_mode():
        for cache in (native, eager):
            model(input_ids=prompt, use_cache=True, **with_cache(model, cache))
        for i in range(12):
            if i == 6:  # cropped, as uncertainty-triggered retrieval does before it reruns a step
                native.crop(-1), eager.crop(-1)
            inputs = dict(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[native.get_seq_length()]]))
            assert step.applies(native, inputs["input_ids"], Session())
            got = step(native, Session(), **inputs).logits[0, -1]
            want = model(**inputs, use_cache=True, logits_to_keep=1, **with_cache(model, eager)).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            token = int(want.argmax())
    assert step.calls == 12
    for a, b in zip(native.layers, eager.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def _ids(result) -> list[int]:
    return [t.id for t in result.tokens]


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_answers_and_citations_with_block_memory_are_the_eager_ones(precision):
    model = _model("llama", precision)
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-llama")
    step = FastStep(model, _kernel())
    memory = mind.memorize("The pass key is 4512. Remember it. The grass is green. " * 6, progress=False)
    ask = dict(memory=memory, chat=False, max_new_tokens=10, block_relevance=0.0, blocks=2)
    mind.native_step = None
    eager = mind.generate(PROMPT, **ask)
    mind.native_step = step
    native = mind.generate(PROMPT, **ask)
    assert eager.blocks_read and native.blocks_read == eager.blocks_read
    assert _ids(native) == _ids(eager)
    assert [c.text for c in native.citations] == [c.text for c in eager.citations] and eager.citations
    for a, b in zip(native.citations, eager.citations):
        assert a.weight == pytest.approx(b.weight, rel=1e-4, abs=1e-6)
    # every step after the prompt's pass reads the slots natively where the fused slot attention is used here
    assert step.calls == (len(native.tokens) - 1 if slot_step.fused_kernel() is not None else 0)
    plain = mind.generate(PROMPT, chat=False, max_new_tokens=10)
    mind.native_step = None
    assert _ids(plain) == _ids(mind.generate(PROMPT, chat=False, max_new_tokens=10))


def test_token_retrieval_and_batches_stay_eager():
    model = _model("llama", "float32")
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-llama")
    step = mind.native_step = FastStep(model, _kernel())
    memory = mind.memorize("The pass key is 4512. Remember it. " * 4, progress=False)
    mind.generate(PROMPT, memory=memory, chat=False, max_new_tokens=6, retrieval="tokens")
    assert step.calls == 0
    cache = new_cache(model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]] * 2), use_cache=True, **with_cache(model, cache))
    assert not step.applies(cache, torch.tensor([[4], [5]]), Session())  # two rows
    assert not step.applies(new_cache(model.config), torch.tensor([[4]]), Session())  # nothing cached yet


def test_models_it_does_not_take_decode_eagerly(monkeypatch):
    assert "model type 'gemma2'" in unsupported(tiny_model("gemma2"))
    assert "float32 models" in unsupported(tiny_model("llama").to(torch.bfloat16))
    sliding = tiny_model("mistral")
    for layer in sliding.model.layers:
        layer.self_attn.sliding_window = 16
    assert "full attention" in unsupported(sliding)
    assert fast_step.fast_step(tiny_model("gemma2")) is None
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert fast_step.fast_step(tiny_model("llama")) is None
    assert ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny").decode_step is None


def test_a_batch_steps_natively_only_where_one_row_decodes_alone():
    model = _model("llama", "float32")
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-llama")
    step = mind.native_step = FastStep(model, _kernel())
    memory = mind.memorize("The pass key is 4512. Remember it. The grass is green. " * 6, progress=False)
    ask = dict(chat=False, max_new_tokens=8, block_relevance=0.0, blocks=2)
    alone = mind.generate(PROMPT, memory=memory, **ask)
    calls = step.calls
    [batched] = mind.generate_batch([PROMPT], [memory], **ask)
    assert _ids(batched) == _ids(alone) and [c.text for c in batched.citations] == [c.text for c in alone.citations]
    assert step.calls - calls == (len(alone.tokens) - 1 if slot_step.fused_kernel() is not None else 0)
    calls = step.calls
    two = mind.generate_batch([PROMPT, "Ships"], [memory, None], **ask)
    assert step.calls == calls and _ids(two[0]) == _ids(alone)
