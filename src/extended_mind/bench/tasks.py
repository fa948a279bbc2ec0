"""The benchmark tasks by name: each turns (lengths, depths, n, seed) into items, from generators or fetched data."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from extended_mind.bench import data, general, icl, synthetic, wikiqa
from extended_mind.bench.items import Item

TASKS = ("passkey", "passkey-prose", "niah", "ruler", "wikiqa", "perplexity", "general", "general-lists", "pair",
         "icl")  # fmt: skip
PERPLEXITY_LOCAL = 2048  # tokens kept in the window; the rest of the document goes to memory


@dataclass
class TaskSpec:
    lengths: list[int]
    n: int = 1
    seed: int = 0
    depths: list[float] | None = None  # passkey and niah
    data_root: Path | None = None


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random("-".join(str(p) for p in (seed, *parts)))  # str seeds are stable across runs


def make_items(task: str, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[Item]:
    """The items of `task`, in a fixed order (length, then depth or kind, then index)."""
    count: Callable[[str], int] = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    depths = spec.depths or list(synthetic.DEPTHS)
    items: list[Item] = []
    if task == "passkey":
        for length in spec.lengths:
            for d in depths:
                items += [synthetic.passkey(length, d, _rng(spec.seed, task, length, d, i), count)
                          for i in range(spec.n)]  # fmt: skip
    elif task == "passkey-prose":
        prose = wiki_prose(spec.data_root)
        for length in spec.lengths:
            for d in depths:
                items += [synthetic.prose_passkey(length, d, _rng(spec.seed, task, length, d, i), count, prose)
                          for i in range(spec.n)]  # fmt: skip
    elif task == "general":
        for length in spec.lengths:
            items += general.general_items(length, spec.n, wiki_prose(spec.data_root), count)
    elif task == "general-lists":  # the same questions over the most list-like text there is
        for length in spec.lengths:
            lines = general.list_lines(a.text for a in data.wikipedia(spec.data_root))
            items += general.general_items(length, spec.n, "\n".join(lines), count, lists=True)
    elif task == "pair":  # lengths: documents per memory
        for documents in spec.lengths:
            items += general.pair_items(documents, spec.n, _rng(spec.seed, task, documents))
    elif task == "icl":  # lengths: demonstrations per prompt or memory
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        items += icl.icl_items(spec.lengths, spec.n, data.wikipedia(spec.data_root),
                               data.words("noun", spec.data_root), spec.seed, encode)  # fmt: skip
    elif task == "niah":
        essays = " ".join(a.text for a in data.essays(spec.data_root))
        for length in spec.lengths:
            for d in depths:
                items += [synthetic.niah(length, d, _rng(spec.seed, task, length, d, i), count, essays)
                          for i in range(spec.n)]  # fmt: skip
    elif task == "ruler":
        essays = " ".join(a.text for a in data.essays(spec.data_root))
        nouns, adjectives = data.words("noun", spec.data_root), data.words("adjective", spec.data_root)
        for length in spec.lengths:
            for kind in synthetic.RULER_TASKS:
                items += [synthetic.ruler(kind, length, _rng(spec.seed, kind, length, i), count, essays, nouns,
                                          adjectives) for i in range(spec.n)]  # fmt: skip
    elif task == "wikiqa":
        articles = data.wikipedia(spec.data_root)
        chosen = wikiqa.spread(wikiqa.questions(articles, spec.seed), spec.n)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        for length in spec.lengths:
            items += [wikiqa.item(q, articles, length, _rng(spec.seed, task, length, q.article, q.year), encode,
                                  tokenizer.decode) for q in chosen]  # fmt: skip
    else:
        raise ValueError(f"make_items does not make {task!r} items")
    return items


def wiki_prose(data_root: Path | None) -> str:
    """The longest Wikipedia articles, joined: a haystack of real prose."""
    articles = sorted(data.wikipedia(data_root), key=lambda a: -len(a.text))
    return " ".join(a.text for a in articles[:12])


@dataclass
class PerplexityDoc:
    id: str
    length: int
    prefix: list[int]  # goes to memory (or the window, or nowhere)
    local: list[int]  # the last PERPLEXITY_LOCAL tokens, scored


def perplexity_docs(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[PerplexityDoc]:
    """Long documents (the longest Wikipedia articles, topped up with the essays when shorter) cut to each length."""
    articles = sorted(data.wikipedia(spec.data_root), key=lambda a: -len(a.text))
    essays = " ".join(a.text for a in data.essays(spec.data_root))
    extra = tokenizer(essays, add_special_tokens=False)["input_ids"]
    docs = []
    for article in articles[: spec.n]:
        ids = tokenizer(article.text, add_special_tokens=False)["input_ids"]
        for length in spec.lengths:
            if length <= PERPLEXITY_LOCAL:
                raise ValueError(f"perplexity lengths must exceed the {PERPLEXITY_LOCAL} local tokens, got {length}")
            full = (ids + extra)[:length] if len(ids) < length else ids[:length]
            docs.append(PerplexityDoc(f"ppl-{length}-{article.title}", length, full[:-PERPLEXITY_LOCAL],
                                      full[-PERPLEXITY_LOCAL:]))  # fmt: skip
    return docs
