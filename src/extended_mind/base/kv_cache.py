"""A KV cache that grows in place: decoding appends one token without copying what is cached.

transformers' DynamicLayer appends by `torch.cat`, copying the whole cache of every layer at every step: on
SmolLM2 with int4 weights (1 thread; docs/measurements.md) a decode token took 25.3 ms after a 500-token prompt and
55.4 ms after a 4,000-token one, 24.3 and 45.2 ms without the copies. Here each
full-attention layer keeps its keys and values in a buffer with room to spare and exposes the filled part as a view
(`keys`, `values`); an append writes into the room, and only a full buffer is copied, into one a quarter larger.
Whatever else sets `keys`/`values` (cropping, selecting rows, our batching's trims and merges) keeps working: a
view that is no longer the buffer's filled prefix is copied into a fresh buffer at the next append. Sliding-window
layers (Gemma, Mistral) keep transformers' own class.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 256  # tokens of room added at least when a buffer is (re)made


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose appends write into spare room (see the module docstring)."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    def _is_prefix_of_buffers(self) -> bool:
        """Whether `keys`/`values` are still the filled prefix of the buffers (else someone replaced them)."""
        k, b = self.keys, self.key_buffer
        if b is None or k is None or k.dim() != 4 or k.data_ptr() != b.data_ptr() or k.stride() != b.stride():
            return False
        v, vb = self.values, self.value_buffer
        return (k.shape[:2] == b.shape[:2] and k.shape[3] == b.shape[3] and v.shape == k.shape
                and v.data_ptr() == vb.data_ptr() and v.stride() == vb.stride())  # fmt: skip

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():  # a compiled graph appends its own way (no data pointers to trace)
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        self.reserve(new, key_states, value_states)
        self.key_buffer[:, :, old:new] = key_states
        self.value_buffer[:, :, old:new] = value_states
        self.expose(new)
        return self.keys, self.values

    def reserve(self, needed: int, key_states: torch.Tensor | None = None,
                value_states: torch.Tensor | None = None) -> None:  # fmt: skip
        """Buffers whose filled prefix is what is cached, with room for `needed` tokens (made like `key_states` /
        `value_states`, else like what is cached): `update` and the native decode step (engine/fast_step.py) write
        the next keys and values into them, then call `expose`."""
        if not self._is_prefix_of_buffers() or needed > self.key_buffer.shape[2]:
            like = (self.keys, self.values) if key_states is None else (key_states, value_states)
            self._rebuffer(needed, *like)

    def expose(self, length: int) -> None:
        """`keys`/`values`: the first `length` tokens of the buffers."""
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def _rebuffer(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Fresh buffers with room for `needed` tokens and a quarter more, holding what is cached now."""
        room = needed + max(MIN_ROOM, needed // 4)
        old = self.get_seq_length()
        shapes = [(*x.shape[:2], room, x.shape[3]) for x in (key_states, value_states)]
        self.key_buffer = key_states.new_empty(shapes[0])
        self.value_buffer = value_states.new_empty(shapes[1])
        if old:
            self.key_buffer[:, :, :old] = self.keys
            self.value_buffer[:, :, :old] = self.values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def new_cache(config: PreTrainedConfig) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers grow in place (GrowingLayer)."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    return cache
