"""The KV cache that grows in place (base/kv_cache.py): the same keys and values as transformers' DynamicLayer under
every operation our engine applies (appends, crops, row selection, trims, replacement), with no copy per append."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from extended_mind.base.kv_cache import MIN_ROOM, GrowingLayer, new_cache
from tests.conftest import tiny_model


def _states(batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, tokens, 8), torch.randn(batch, 2, tokens, 8)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_under_every_operation():
    torch.manual_seed(0)
    growing, plain = GrowingLayer(), DynamicLayer()

    def both(op) -> None:
        op(growing)
        op(plain)
        if plain.keys is None:  # reset
            assert growing.keys is None and growing.get_seq_length() == 0
            return
        assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
        assert growing.get_seq_length() == plain.get_seq_length()

    def append(batch: int, tokens: int):
        k, v = _states(batch, tokens)
        return lambda layer: layer.update(k, v)

    def trim(start: int):
        def op(layer):  # what batching's _trim does: the layer's views replaced from outside
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

        return op

    both(append(3, 5))  # a prompt
    for _ in range(MIN_ROOM + 10):  # decode steps, past the first buffer's room
        both(append(3, 1))
    both(lambda layer: layer.crop(-2))  # a retried step
    both(append(3, 1))
    both(lambda layer: layer.batch_select_indices(torch.tensor([0, 2])))  # a row left
    both(append(2, 1))
    both(trim(4))
    both(append(2, 1))
    both(append(2, 7))  # a chunk
    both(lambda layer: layer.reset())
    both(append(1, 3))


def test_an_append_writes_into_the_room_without_copying():
    layer = GrowingLayer()
    layer.update(*_states(1, 10))
    buffer = layer.key_buffer
    before = layer.keys.clone()
    keys, _ = layer.update(*_states(1, 1))
    assert layer.key_buffer is buffer and keys.data_ptr() == buffer.data_ptr()  # a view of the same buffer
    assert torch.equal(keys[:, :, :10], before) and buffer.shape[2] >= 10 + MIN_ROOM


def test_new_cache_grows_full_attention_layers_and_leaves_sliding_ones():
    cache = new_cache(tiny_model("gemma2").config)  # alternating sliding and full attention layers
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "GrowingLayer" in kinds and len(kinds) == 2
    assert all(type(layer) is GrowingLayer for layer in new_cache(tiny_model("llama").config).layers)
