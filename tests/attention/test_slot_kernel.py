"""The compiled slot attention (kernels/slot_attend.cpp) computes what the torch operations compute."""

import pytest
import torch

from extended_mind.attention import slot_step
from extended_mind.retrieval.layer import LayerMemory
from extended_mind.retrieval.native import slot_kernel


@pytest.fixture(scope="module")
def kernel():
    built = slot_kernel()
    if built is None:
        pytest.skip("the slot attention kernel is not built here (no compiler or no AVX2)")
    return built


@pytest.mark.parametrize("threads", [1, 2])  # one run of slots per head, or chunks the threads share
@pytest.mark.parametrize("weighting", [None, "attention", "attention_value"])
@pytest.mark.parametrize("shape", [(9, 3, 64, 512, 40), (4, 4, 80, 33, 7), (8, 2, 128, 100, 1)],
                         ids=["smollm2", "odd-dims", "wide-heads"])  # fmt: skip
def test_the_fused_slot_step_equals_the_torch_one(kernel, monkeypatch, shape, weighting, threads):
    hq, h, d, s, local = shape
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(hq + d + s)
    query = torch.randn(1, hq, 1, d, generator=gen)
    buffer = torch.randn(2, 1, h, local + 5, d, generator=gen)  # the cache's buffers, read up to `local` rows
    key, value = buffer[0, :, :, :local], buffer[1, :, :, :local]
    mask = torch.ones(1, 1, 1, local, dtype=torch.bool)
    mask[..., local // 2] = local == 1  # a masked local key (none when there is only one)
    mem = LayerMemory(keys=torch.randn(h, s, d, generator=gen), values=torch.randn(h, s, d, generator=gen),
                      inv_norms=torch.ones(h, s), slot_tokens=torch.arange(100, 100 + s),
                      value_norms=torch.rand(h, s, generator=gen))  # fmt: skip
    monkeypatch.setattr(slot_step, "fused_kernel", lambda: kernel)
    try:
        fused, fused_record = slot_step.attend_slot_step(query, key, value, mask, mem, d**-0.5, weighting)
        unmasked = slot_step.attend_slot_step(query, key, value, None, mem, d**-0.5, None)[0]
    finally:
        torch.set_num_threads(before)
    plain, plain_record = slot_step._torch_step(query, key, value, mask, mem, d**-0.5, weighting)
    assert fused.shape == plain.shape == (1, 1, hq, d)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    if weighting is None:
        assert fused_record is None and plain_record is None
        torch.testing.assert_close(unmasked, slot_step._torch_step(query, key, value, None, mem, d**-0.5, None)[0],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    else:
        assert torch.equal(fused_record[0], plain_record[0])
        torch.testing.assert_close(fused_record[1], plain_record[1], atol=1e-6, rtol=1e-5)


def test_other_layouts_take_the_torch_operations(kernel, monkeypatch):
    """bfloat16 slots, or two sequences at once: not what the kernel reads, so the torch path answers."""
    calls = []
    monkeypatch.setattr(slot_step, "fused_kernel", lambda: calls.append(1) or kernel)
    query, key = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 3, 16)
    mem = LayerMemory(keys=torch.randn(2, 8, 16), values=torch.randn(2, 8, 16), inv_norms=torch.ones(2, 8),
                      slot_tokens=torch.arange(8))  # fmt: skip
    out, _ = slot_step.attend_slot_step(query, key, key, None, mem, 0.25, None)
    torch.testing.assert_close(out, slot_step._torch_step(query, key, key, None, mem, 0.25, None)[0])
    half = LayerMemory(keys=mem.keys.bfloat16(), values=mem.values.bfloat16(), inv_norms=mem.inv_norms,
                       slot_tokens=mem.slot_tokens)  # fmt: skip
    slot_step.attend_slot_step(query[:1], key[:1], key[:1], None, half, 0.25, None)
    assert calls == []
