"""The correctness oracles on a GPU (skipped where CUDA is absent; run on a lent GPU machine by scripts/gpu_check.sh).

The model, the memory's prepared keys and the scores live on the GPU; the memory's stored tensors stay on the CPU
(files, memory maps). The equalities of the CPU hold there: top-k 0 is the unmodified model (to float32 rounding:
sdpa may pick another kernel), reading every memory at its document positions is the full context, block memory
reading every block is the full context; a memory saved and loaded answers the same; batched generation equals
one by one; and the default bfloat16 model generates with memory and citations.
"""

from __future__ import annotations

import copy

import pytest
import torch

from extended_mind import ExtendedMind, Memory
from tests.attention.test_oracles import (
    check_all_memories_equal_full_context,
    check_every_block_equals_full_context,
    memorize_ids,
)
from tests.conftest import byte_tokenizer, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
FAMILIES_ON_GPU = ["gemma3", "llama", "mpt", "phi3", "qwen3"]  # two RoPE kinds, ALiBi, partial rotary, q/k norms


@pytest.fixture(params=FAMILIES_ON_GPU)
def gpu_pair(request) -> tuple[ExtendedMind, torch.nn.Module]:
    """(mind, reference) on the GPU in float32: full-context equality is checked to float32 tolerance."""
    model = tiny_model(request.param)
    reference = copy.deepcopy(model).to(CUDA)
    return ExtendedMind(model.to(CUDA), byte_tokenizer(), f"tiny-{request.param}"), reference


def test_topk_zero_is_the_unmodified_model_on_gpu(gpu_pair):
    mind, reference = gpu_pair
    torch.manual_seed(1)
    memory = memorize_ids(mind, [torch.randint(0, 256, (90,))])
    prompt = torch.randint(0, 256, (1, 24))
    with torch.inference_mode():
        expected = reference(prompt.to(CUDA)).logits
    for options in (dict(topk=0, retrieval="tokens", position_policy="zero"), dict(topk=0), dict(blocks=0)):
        got = mind.logits(prompt, memory=memory, **options)
        assert got.device.type == "cuda"
        # the same attention function, but on a GPU sdpa may pick another kernel for an explicit mask than for
        # is_causal: equal to float32 rounding rather than bit for bit (on the CPU, tests/attention/test_oracles.py)
        diff = (got - expected).abs().max().item()
        print(f"top-k 0 against the unmodified model, {options}: max |diff| {diff:.2e}")
        assert diff < 1e-5
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_all_memories_at_document_positions_equal_full_context_on_gpu(gpu_pair):
    check_all_memories_equal_full_context(*gpu_pair, CUDA)


def test_block_memory_reading_every_block_equals_full_context_on_gpu(gpu_pair):
    check_every_block_equals_full_context(*gpu_pair, CUDA)


def test_saved_memory_answers_the_same_and_batch_equals_one_by_one_on_gpu(tmp_path):
    mind = ExtendedMind(tiny_model("llama").to(CUDA), byte_tokenizer(), "tiny-llama")
    memory = mind.memorize(["The cat sat on the mat. Its name is Orlo. " * 3, "Ships sail at dawn. " * 5],
                           progress=False)  # fmt: skip
    options = dict(max_new_tokens=8, chat=False, topk=3)
    before = mind.generate("Who sat on the mat?", memory=memory, **options)
    loaded = Memory.load(memory.save(tmp_path / "m"))
    after = mind.generate("Who sat on the mat?", memory=loaded, **options)
    assert [t.id for t in after.tokens] == [t.id for t in before.tokens]
    assert [(c.doc, c.start) for c in after.citations] == [(c.doc, c.start) for c in before.citations]
    prompts = ["Who sat on the mat?", "When do ships sail?", "Hello"]
    alone = [mind.generate(p, memory=m, **options) for p, m in zip(prompts, [memory, loaded, None])]
    batch = mind.generate_batch(prompts, [memory, loaded, None], **options)
    assert [[t.id for t in b.tokens] for b in batch] == [[t.id for t in a.tokens] for a in alone]


def test_bfloat16_default_on_gpu_generates_with_memory_and_citations():
    model = tiny_model("qwen3").to(CUDA, torch.bfloat16)
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-qwen3-bf16")
    memory = mind.memorize("The keeper of the lighthouse is Ada. " * 4, progress=False)
    for options in (
        dict(retrieval="tokens", topk=4),
        dict(blocks=2, block_size=16, block_gate=0.0, block_relevance=0.0),
    ):
        result = mind.generate("Who keeps the light?", memory=memory, max_new_tokens=6, chat=False, **options)
        assert len(result.tokens) == 6
        assert result.citations and all(c.doc == memory.documents[0].id for c in result.citations)
