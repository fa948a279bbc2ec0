"""A compiled decode step: torch.compile of the model's one-token forward, for the steps of an answer that reads no
memory (no memory given, or block memory found no block relevant; most questions a chat user asks).

Memory attention stays eager: it runs Python per layer (retrieval, citations) and reads its session from a context
variable, which a compiled graph cannot trace (attention/session.py returns no session inside one), so a step that
reads memory is never sent here. The graph is compiled with dynamic shapes on the first call (20 s to a few
minutes for SmolLM2 on 2 cores; later processes reuse inductor's disk cache in part) and works on the KV cache
generation already uses. It computes what the eager forward computes, but fused ops round differently, so a long
greedy answer may part from the eager one after tens of tokens. Where compiling fails (no C++ compiler, an op
inductor cannot lower) the step falls back to the eager forward for good, with a warning saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from extended_mind.attention.session import Session, plain_step

logger = logging.getLogger(__name__)

COMPILE_ENV = "EXTENDED_MIND_COMPILE"


def compile_requested(compile: bool | None) -> bool:
    """`compile` when given, else `$EXTENDED_MIND_COMPILE` ("1", "true", "yes": on); off by default, since compiling
    costs 20 s to a few minutes per process for a step about 1.1x faster at best (docs/measurements.md)."""
    if compile is not None:
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True, False or None, got {compile!r}")
        return compile
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class CompiledStep:
    """Call like the model's forward for one decode step without memory; compiled on first use, eager after a
    failure (`failure` says why)."""

    def __init__(self, model: PreTrainedModel, compiler: Callable = torch.compile):
        self.model = model
        self._compiler = compiler
        self._compiled: Callable | None = None
        self.failure: str | None = None
        self.compiled_calls = 0  # steps that ran compiled (tests and benchmarks check the path taken)

    def _options(self) -> dict:
        # inductor's cpp_wrapper (the graph called from C++) cut the framework's cost per step further on a skinny
        # model, but not the real model's step, and tripled compiling (docs/measurements.md): `$EXTENDED_MIND_
        # COMPILE_CPP_WRAPPER=1` turns it on to measure
        return {"cpp_wrapper": True} if os.environ.get(f"{COMPILE_ENV}_CPP_WRAPPER") == "1" else {}

    @staticmethod
    def applies(kv_cache, input_ids: torch.Tensor, session: Session) -> bool:
        """A one-token step that reads no memory."""
        return input_ids.shape[-1] == 1 and not session.layers

    def __call__(self, kv_cache, /, session: Session | None = None, **inputs):
        if self.failure is None:
            before = [layer.get_seq_length() for layer in kv_cache.layers]
            try:
                if self._compiled is None:
                    self._compiled = self._compiler(self.model.forward, dynamic=True, options=self._options())
                with plain_step():
                    out = self._compiled(**inputs)
                self.compiled_calls += 1
                return out
            except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager forward, as correct
                first_line = (str(exc).strip().splitlines() or [""])[0]
                self.failure = f"{type(exc).__name__}: {first_line[:300]}"
                logger.warning("the compiled decode step is unavailable here, decoding eagerly: %s", self.failure)
                for layer, length in zip(kv_cache.layers, before):  # a graph that ran in part: its entries go
                    grown = layer.get_seq_length() - length
                    if grown:
                        layer.crop(-grown)
        return self.model(**inputs)
