"""A native decode step: one token of one answer through every decoder layer in a single C++ call
(kernels/decode_step.cpp), for the steps that read no memory, on the CPU.

At one token on a small model the Python between the operators is a third of the step: on SmolLM2 with 4-bit
weights the eager forward took 22.2-22.8 ms per token, of which the operators' own time was 14.7 ms and the rest
transformers' modules, hooks and our weight wrappers (docs/measurements.md). The kernel runs the same ATen
operators as those modules (RMS norm, the projections through the same float, int8 or 4-bit kernels, rotary
embedding, scaled dot-product attention, SiLU-gated MLP) and writes the new key and value into the cache's
buffers (base/kv_cache.py); the embedding, the rotary tables, the final norm and the output layer stay the model's
own modules. So it computes what the eager forward computes, up to the rounding of fused operations.

Used where it applies (Llama-style decoders: Llama, Mistral without a sliding window, Qwen2, Qwen3; float32
activations on the CPU; one row; a cache whose layers all grow in place) and where a timing once per process and
model says it is not slower than the eager forward; everywhere else the eager forward runs. Like the compiled
step (compiled.py) it never runs a step that reads memory. `$EXTENDED_MIND_NATIVE=0` turns it off with the other
kernels.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import PreTrainedModel

from extended_mind.attention import slot_step
from extended_mind.attention.session import Session
from extended_mind.attention.slot_step import citation_weights, fusable_slots
from extended_mind.base.compat import with_cache
from extended_mind.base.kv_cache import GrowingLayer, new_cache
from extended_mind.base.weights import INT4_GROUP, Int4DecodeLinear, Int8DecodeLinear
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.native import NATIVE_ENV, decode_kernel

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip
_EMPTY = torch.empty(0)
_KIND = {torch.nn.Linear: 0, Int8DecodeLinear: 1, Int4DecodeLinear: 2}


def unsupported(model: PreTrainedModel) -> str | None:
    """Why the native step cannot run this model (None: it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} is not one of {', '.join(FAMILIES)}"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "the native step runs float32 models on the CPU"
    if getattr(config, "hidden_act", "silu") != "silu":
        return "the native step needs SiLU MLPs"
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            return "the native step needs full attention in every layer"
        for part, name in _PROJECTIONS:
            if type(getattr(getattr(layer, part), name, None)) not in _KIND:
                return f"{part}.{name} is not a linear layer the native step knows"
    return None


class FastStep:
    """Call like the model's forward for one decode step without memory (one row, one token); returns an object
    with `.logits` (1, 1, vocabulary). `applies(cache, inputs)` says whether a step can take this path."""

    def __init__(self, model: PreTrainedModel, kernel):
        self.model, self.kernel = model, kernel
        config, first = model.config, model.model.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = first.head_dim, float(first.scaling)
        self.eps = float(model.model.layers[0].input_layernorm.variance_epsilon)
        self.calls = 0  # steps that ran natively (tests and benchmarks check the path taken)
        self._modules: list[torch.nn.Module] = []
        self._classes: list[type] = []
        self._args: tuple = ()
        self._slot_cache: tuple[dict, str | None, _Slots | None] | None = None  # per set of layers and weighting
        count = len(model.model.layers)
        self._no_slots = _Slots([_EMPTY] * count, [_EMPTY] * count, [_EMPTY] * count, [], False)

    def _weights(self) -> tuple:
        """The per-layer norms, projection tensors and kinds, rebuilt when a layer's weights changed class
        (base/weights.py gives and drops decode weights by changing it)."""
        if [type(m) for m in self._modules] == self._classes and self._args:
            return self._args
        norms, linears, kinds, modules = [], [], [], []
        for layer in self.model.model.layers:
            attn = layer.self_attn
            head_norms = [getattr(attn, name, None) for name in ("q_norm", "k_norm")]  # Qwen3's, before RoPE
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                      *(_EMPTY if n is None else n.weight for n in head_norms)]  # fmt: skip
            for part, name in _PROJECTIONS:
                module = getattr(getattr(layer, part), name)
                kind = _KIND[type(module)]
                tensors = [module.weight, _EMPTY] if kind == 0 else module.codes()
                linears += [*tensors, _EMPTY if module.bias is None else module.bias]
                kinds.append(kind)
                modules.append(module)
        self._modules, self._classes = modules, [type(m) for m in modules]
        self._args = (norms, linears, kinds)
        return self._args

    def applies(self, cache, input_ids: torch.Tensor, session: Session) -> bool:
        """Whether this step (one row, one token, after a prompt) can run natively: the cache's layers all grow in
        place, and any memory the session reads is block memory's slots the fused slot attention takes."""
        layers = cache.layers
        if input_ids.shape != (1, 1) or not all(type(layer) is GrowingLayer for layer in layers):
            return False
        return layers[0].get_seq_length() > 0 and self._slots(session) is not None

    def _slots(self, session: Session) -> _Slots | None:
        """The slots each layer reads in this session's steps (cached per set of layers), or None where a layer's
        memory cannot be read natively (token retrieval, slots not float32, a row placed before the slots)."""
        layers = session.layers if session.settings is not None and session.settings.topk > 0 else {}
        if not layers:
            return self._no_slots
        weighting = session.citation_weighting if session.record_citations else None
        if self._slot_cache is None or self._slot_cache[0] is not layers or self._slot_cache[1] != weighting:
            self._slot_cache = (layers, weighting, _slots_of(layers, len(self.model.model.layers), weighting))
        slots = self._slot_cache[2]
        if slots is None or session.row_positions is None:
            return None
        return slots if session.first_position(session.row_positions) >= slots.end else None

    def __call__(self, cache, /, session: Session, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 **_) -> SimpleNamespace:  # fmt: skip
        inner = self.model.model
        slots = self._slots(session)
        x = inner.embed_tokens(input_ids)[0]  # (1, hidden)
        cos, sin = inner.rotary_emb(x, position_ids)
        filled = cache.layers[0].get_seq_length()
        keys, values = [], []
        for layer in cache.layers:
            layer.reserve(filled + 1)
            keys.append(layer.key_buffer)
            values.append(layer.value_buffer)
        norms, linears, kinds = self._weights()
        out = self.kernel.decode_layers(x, cos.view(1, 1, 1, -1), sin.view(1, 1, 1, -1), norms, linears, kinds, keys,
                                        values, filled, self.heads, self.kv_heads, self.head_dim, self.eps,
                                        self.scaling, INT4_GROUP, slots.keys, slots.values, slots.weights,
                                        slots.cite)  # fmt: skip
        for layer in cache.layers:
            layer.expose(filled + 1)
        if slots.cite:
            session.citation_records.extend((tokens, out[1 + i]) for i, tokens in slots.tokens)
        self.calls += 1
        logits = self.model.lm_head(inner.norm(out[0]))
        return SimpleNamespace(logits=logits.view(1, 1, -1))


@dataclass
class _Slots:
    """Per decoder layer, the slots it reads (empty tensors where none) as the kernel takes them."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    weights: list[torch.Tensor]
    tokens: list[tuple[int, torch.Tensor]]  # (layer, slot tokens) of the layers that read slots
    cite: bool
    end: int = 0  # the largest slot_end: a row at or after it reads every slot


def _slots_of(layers: dict[int, LayerMemory], count: int, weighting: str | None) -> _Slots | None:
    if slot_step.fused_kernel() is None:  # the fused slot attention is slower here than torch's operations
        return None
    slots = _Slots([_EMPTY] * count, [_EMPTY] * count, [_EMPTY] * count, [], weighting is not None)
    for i, mem in layers.items():
        if mem.num_keys == 0:
            continue
        if mem.slot_tokens is None or mem.shard is not None or not fusable_slots(mem):  # whole slots on this rank
            return None
        slots.keys[i], slots.values[i] = mem.keys, mem.values
        slots.weights[i] = citation_weights(mem, weighting)
        slots.tokens.append((i, mem.slot_tokens))
        slots.end = max(slots.end, mem.slot_end)
    return slots


def fast_step(model: PreTrainedModel) -> FastStep | None:
    """The native step for `model` where it applies, is built and is not slower here than the eager forward (timed
    once, on 8 steps each after a 64-token prompt); else None."""
    if os.environ.get(NATIVE_ENV, "1") == "0" or unsupported(model) is not None:
        return None
    if (kernel := decode_kernel()) is None:
        return None
    step = FastStep(model, kernel)
    return step if _not_slower(model, step) else None


def _not_slower(model: PreTrainedModel, step: FastStep) -> bool:
    vocab = model.config.vocab_size
    prompt = torch.arange(64).remainder(vocab).view(1, -1)
    times: dict[str, list[float]] = {"native": [], "eager": []}
    with torch.inference_mode():
        caches = {name: new_cache(model.config) for name in times}
        for cache in caches.values():
            model(input_ids=prompt, use_cache=True, **with_cache(model, cache))
        for i in range(9):
            for name, cache in caches.items():
                inputs = dict(input_ids=torch.tensor([[i + 1]]), position_ids=torch.tensor([[64 + i]]))
                start = time.perf_counter()
                if name == "native":
                    step(cache, Session(), **inputs)
                else:
                    model(**inputs, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
                if i:  # the first step of each warms up
                    times[name].append(time.perf_counter() - start)
    return statistics.median(times["native"]) <= statistics.median(times["eager"])
