"""A greedy answer quoting a block it reads goes on quoting where the model hesitates (engine/quoting.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from extended_mind.base.errors import ExtendedMindError
from extended_mind.engine.block_layout import BlockLayout
from extended_mind.engine.layouts import SURE_TOKENS
from extended_mind.engine.options import GenerationOptions
from extended_mind.engine.quoting import QUOTE_CANDIDATES, Quotes
from tests.conftest import VOCAB, byte_tokenizer
from tests.engine.test_batching import CATS, SHIPS, SINK_CHAT_TEMPLATE

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def quotes_of(*passages: str, below: float = 0.5) -> Quotes:
    """Quotes of `passages`, each one block of its own document (so no run joins two of them)."""
    tokens = [torch.tensor(ids(p)) for p in passages]
    lengths = torch.tensor([len(t) for t in tokens])
    starts = torch.cumsum(lengths, 0) - lengths
    layout = BlockLayout(64, torch.repeat_interleave(torch.arange(len(passages)), lengths), starts, lengths,
                         torch.arange(len(passages)))  # fmt: skip
    plan = SimpleNamespace(layout=layout, token_ids=lambda blocks: torch.cat([tokens[b] for b in blocks.tolist()]))
    return Quotes({}, TOK, frozenset({EOS}), below).reading(plan, torch.arange(len(passages)))


def logits_for(ranked: list[int], best: float) -> torch.Tensor:
    """Logits whose likeliest token is ranked[0] with probability about `best`, the others in `ranked` next."""
    out = torch.full((VOCAB,), -30.0)
    rest = (1 - best) / (len(ranked) - 1)
    for i, t in enumerate(ranked):
        out[t] = float(torch.tensor(best if i == 0 else rest * (1 - 0.01 * i)).log())
    return out


def test_an_unsure_answer_goes_on_quoting_a_passage_it_reads():
    q = quotes_of("The key is 42. Other text", "unrelated words")
    said = ids("key is")  # the passage's next token after "ey is" (3 bytes) is " "
    space, a = ids(" ")[0], ids("a")[0]
    unsure = logits_for([a, ids("b")[0], space, ids("c")[0]], best=0.4)
    assert q.follow(unsure, a, said) == space
    sure = logits_for([a, ids("b")[0], space], best=0.6)  # the model is sure: its own token
    assert q.follow(sure, a, said) == a
    q_never = quotes_of("The key is 42. Other text", below=0.3)
    assert q_never.follow(unsure, a, said) == a


def test_a_quote_is_followed_only_where_the_model_would_consider_it():
    q = quotes_of("The key is 42.")
    said, space = ids("key is"), ids(" ")[0]
    others = [t for t in range(40, 40 + QUOTE_CANDIDATES) if t != space]
    far = logits_for([*others, space], best=0.3)  # the passage's next token ranked past the candidates
    assert q.follow(far, others[0], said) == others[0]
    assert q.follow(logits_for([space, *others], best=0.3), space, said) == space  # its own: unchanged


def test_a_quote_needs_three_tokens_and_stops_at_the_answers_end_and_its_sentence():
    q = quotes_of("The key is 42. Other text")
    a, b, c, space = ids("a")[0], ids("b")[0], ids("c")[0], ids(" ")[0]
    unsure = logits_for([a, space, b, c], best=0.4)
    assert q.follow(unsure, a, ids("key is")) == space  # (what the cases below hold back)
    assert q.follow(unsure, a, ids("is")) == a  # two tokens: chance
    assert q.follow(logits_for([EOS, space, b, c], best=0.4), EOS, ids("key is")) == EOS  # the answer ends here
    assert q.follow(unsure, a, ids("42.")) == a  # the passage goes on " Other": a new sentence is the model's own
    dot = ids(".")[0]  # the model ends its sentence where the passage goes on: the answer may say less
    assert q.follow(logits_for([dot, space, b, c], best=0.4), dot, ids("key is")) == dot
    assert q.follow(unsure, a, ids("xyz")) == a  # not a quote


def test_a_quote_does_not_run_from_one_passage_into_another():
    q = quotes_of("ab", "cdef")  # "abc" spans the two passages: no quote
    assert tuple(ids("abc")) not in q.next_tokens and tuple(ids("cde")) in q.next_tokens


def _second_likeliest(self: Quotes, logits: torch.Tensor, token: int, generated: list[int]) -> int:
    """A stand-in rule that changes answers visibly: every third token the second likeliest."""
    return int(logits.topk(2).indices[1]) if len(generated) % 3 == 2 else token


@pytest.mark.parametrize("block_break", ["auto", "surer"])
def test_every_path_quotes_alike(tiny_pair, monkeypatch, block_break):
    """The rule acts in each path an answer takes: one answer, a batch (going on from the layout trial, or
    prefilled again where rows cannot share a cache) and the layout trials, so they answer alike; with
    quote_threshold 0 it never acts."""  # (the real rule acts where a random model's bytes happen to quote)
    mind, _ = tiny_pair
    mind.tokenizer.chat_template = SINK_CHAT_TEMPLATE
    memory = mind.memorize(SHIPS + " " + CATS, progress=False)
    banned = {mind.tokenizer.eos_token_id: -100.0}
    options = dict(chat=True, max_new_tokens=SURE_TOKENS + 4, block_size=16, blocks=1, block_relevance=0.0,
                   block_words=0, block_break=block_break, logit_bias=banned)  # fmt: skip
    prompts = ["Who is the captain?", "Where did the cat sit?"]
    plain = [mind.generate(p, memory=memory, quote_threshold=0.0, **options) for p in prompts]
    monkeypatch.setattr(Quotes, "follow", _second_likeliest)
    alone = [mind.generate(p, memory=memory, **options) for p in prompts]
    batch = mind.generate_batch(prompts, [memory, memory], **options)
    off = [mind.generate(p, memory=memory, quote_threshold=0.0, **options) for p in prompts]
    for a, b, p, o in zip(alone, batch, plain, off):
        assert a.blocks_read
        assert [t.id for t in b.tokens] == [t.id for t in a.tokens]
        assert [t.id for t in a.tokens] != [t.id for t in p.tokens]  # the stand-in acted
        assert [t.id for t in o.tokens] == [t.id for t in p.tokens]


def test_quote_threshold_out_of_range_is_a_clear_error():
    for bad in (1.5, -0.1):
        with pytest.raises(ExtendedMindError, match="quote_threshold"):
            GenerationOptions.of(quote_threshold=bad)
