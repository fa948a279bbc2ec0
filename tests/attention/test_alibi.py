"""ALiBi (MPT) specifics, beyond the oracles every family passes (test_oracles.py): the reference's position rule,
the bias really depending on distance, and families that are refused when wrapped."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, GPT2Config

from extended_mind import ExtendedMind, ExtendedMindError
from tests.attention.test_oracles import FULL_CONTEXT_ATOL, memorize_ids
from tests.conftest import VOCAB, byte_tokenizer, tiny_model


def test_zero_policy_puts_a_memory_just_before_the_prompt():
    # The reference's ALiBi rule: every memory at one distance, one position before the prompt's first token. With
    # a one-token memory that is exactly the context [token, prompt] (the sink row, the prompt's first, reads none).
    model = tiny_model("mpt")
    reference = copy.deepcopy(model)
    mind = ExtendedMind(model, byte_tokenizer(), "tiny-mpt")
    torch.manual_seed(5)
    token, prompt = torch.randint(0, 256, (1,)), torch.randint(0, 256, (1, 12))
    memory = memorize_ids(mind, [token])
    mask = torch.ones(13, 13, dtype=torch.bool).tril()
    mask[1, 0] = False
    additive = torch.zeros(13, 13).masked_fill(~mask, torch.finfo(torch.float32).min)  # MPT is eager: it takes this
    with torch.inference_mode():
        expected = reference(torch.cat([token[None], prompt], 1), attention_mask=additive[None, None]).logits[:, 1:]
    got = mind.logits(prompt, memory=memory, topk=1, retrieval="tokens", position_policy="zero")
    assert (got - expected).abs().max().item() < FULL_CONTEXT_ATOL


def test_alibi_bias_depends_on_the_memory_position():
    # The same memory read as if far away (stored positions of a long document) or right before the prompt gives
    # different answers: the bias is applied, not dropped.
    mind = ExtendedMind(tiny_model("mpt"), byte_tokenizer(), "tiny-mpt")
    torch.manual_seed(6)
    memory = memorize_ids(mind, [torch.randint(0, 256, (120,))], window=128)
    prompt = torch.randint(0, 256, (1, 10))
    near = mind.logits(prompt, memory=memory, topk=8, retrieval="tokens", position_policy="zero")
    far = mind.logits(prompt, memory=memory, topk=8, retrieval="tokens", position_policy="stored")
    assert (near - far).abs().max().item() > 1e-3


def test_generation_with_memory_and_citations_on_mpt():
    mind = ExtendedMind(tiny_model("mpt"), byte_tokenizer(), "tiny-mpt")
    memory = mind.memorize(["The pass key is 4321. " * 4, "Another document about something else."])
    result = mind.generate("What is the pass key?", memory=memory, max_new_tokens=4, chat=False)
    assert len(result.tokens) == 4
    assert result.citations  # attention on memory tokens is mapped back to documents


@pytest.mark.parametrize(
    "config, reason",
    [
        (BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), "compute attention inline"),
        (
            FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True),
            "compute attention inline",
        ),
        (
            GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
            "no rotary position embeddings",
        ),
    ],
    ids=["bloom", "falcon-alibi", "gpt2"],
)
def test_unsupported_families_are_refused_by_name(config, reason):
    model = AutoModelForCausalLM.from_config(config).eval()
    implementation = model.config._attn_implementation
    with pytest.raises(ExtendedMindError) as err:
        ExtendedMind(model, byte_tokenizer(), "tiny")
    assert type(model).__name__ in str(err.value) and reason in str(err.value)
    assert model.config._attn_implementation == implementation  # a refused model is left as it was
