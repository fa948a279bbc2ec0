"""The compiled decode step (engine/compiled.py): the same tokens as the eager forward, used only for steps that
read no memory, and a clean fallback to eager when compiling fails (no compiler, an unsupported op)."""

from __future__ import annotations

import logging

import pytest
import torch

from extended_mind import ExtendedMind
from extended_mind.base import weights
from extended_mind.engine.compiled import COMPILE_ENV, CompiledStep, compile_requested
from tests.conftest import byte_tokenizer, tiny_model

PROMPT = "The sea and the ships that sail on it"


def _ids(result) -> list[int]:
    return [t.id for t in result.tokens]


def test_compiled_step_gives_the_eager_tokens_and_never_runs_a_memory_step():
    model = tiny_model("llama")
    if weights.int8_decode_available():  # the kernels go through the compiled graph as opaque ops (int4 layers,
        weights.use_decode_weights(model, "int4" if weights.int4_decode_available() else "int8")  # a shortlisted head)
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-llama", compile=True)
    step = mind.compiled_step
    assert step is not None
    compiled = mind.generate(PROMPT, chat=False, max_new_tokens=12)
    assert step.failure is None, step.failure
    assert step.compiled_calls == len(compiled.tokens) - 1  # every step after the prompt's pass
    mind.compiled_step = None
    assert _ids(compiled) == _ids(mind.generate(PROMPT, chat=False, max_new_tokens=12))

    memory = mind.memorize("The pass key is 4512. Remember it. " * 4, progress=False)
    eager = mind.generate(PROMPT, memory=memory, chat=False, max_new_tokens=8, retrieval="tokens")
    mind.compiled_step = step
    calls = step.compiled_calls
    with_memory = mind.generate(PROMPT, memory=memory, chat=False, max_new_tokens=8, retrieval="tokens")
    assert step.compiled_calls == calls  # memory attention stays eager: a compiled graph cannot see the session
    assert _ids(with_memory) == _ids(eager) and with_memory.citations


def test_a_model_compiled_by_its_user_still_reads_memory():
    """Only our plain step hides the session from the graph: a user's own torch.compile keeps memory attention."""
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    memory = mind.memorize("The pass key is 4512. Remember it. " * 4, progress=False)
    ask = dict(memory=memory, chat=False, max_new_tokens=4, retrieval="tokens")
    eager = mind.generate(PROMPT, **ask)
    mind.model.forward = torch.compile(mind.model.forward)
    compiled = mind.generate(PROMPT, **ask)
    assert _ids(compiled) == _ids(eager)
    assert [c.text for c in compiled.citations] == [c.text for c in eager.citations] and eager.citations


def _failing_compiler(run_first: bool):
    def compiler(forward, **_):
        def compiled(**inputs):
            if run_first:  # a graph that updated the KV cache before a later part failed to compile (every layer)
                forward(**inputs)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    return compiler


@pytest.mark.parametrize("run_first", [False, True])
def test_a_failed_compile_decodes_eagerly_with_a_warning(run_first, caplog):
    mind = ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny-llama")
    expected = mind.generate(PROMPT, chat=False, max_new_tokens=10)
    mind.compiled_step = CompiledStep(mind.model, compiler=_failing_compiler(run_first))
    with caplog.at_level(logging.WARNING, logger="extended_mind.engine.compiled"):
        got = mind.generate(PROMPT, chat=False, max_new_tokens=10)
        again = mind.generate(PROMPT, chat=False, max_new_tokens=10)
    assert _ids(got) == _ids(expected) == _ids(again)
    assert "InvalidCxxCompiler" in mind.compiled_step.failure and mind.compiled_step.compiled_calls == 0
    assert sum("decoding eagerly" in r.getMessage() for r in caplog.records) == 1  # said once, not per step


def test_compile_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_requested(None) is False
    assert ExtendedMind(tiny_model("llama"), byte_tokenizer(), "tiny").compiled_step is None
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_requested(None) is True and compile_requested(False) is False
    with pytest.raises(TypeError, match="compile must be"):
        compile_requested("yes")  # type: ignore[arg-type]
