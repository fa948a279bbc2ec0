"""Counterfactual question answering over real Wikipedia articles (the EMT paper's benchmark, rebuilt offline).

Questions are made by code, not by hand: a sentence of the (lower-cased) article that states a year becomes "complete
this sentence", and that year is replaced everywhere in the article by a plausible wrong one (a few years off, a year
the article never mentions). A model that answers with the counterfactual year read the document; one that answers
with the true year answered from what it learned in training. Every item is verified by code: the true year is in the
original article and the counterfactual is not; after the edit the document holds the counterfactual, not the true
year, and still holds the question's sentence. Score: the counterfactual year among the first 30 greedy tokens.

Documents come at target lengths: a longer article is cut to a window around the question's sentence; a shorter one
is placed at a random depth among other articles that mention neither year, up to the length."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extended_mind.bench.data import Article
from extended_mind.bench.items import Item

_YEAR = re.compile(r"(?<![\w.,$£€-])(1[2-9]\d\d|20[0-2]\d)(?![\w%]|[.,]\d)")
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")
PREFIX_WORDS = 14
MIN_PREFIX_WORDS = 8


class VerificationError(AssertionError):
    """A generated item breaks one of the counterfactual checks (a bug in the generator, never expected)."""


@dataclass(frozen=True)
class Question:
    article: str  # title
    year: str  # the true answer
    counterfactual: str
    prefix: str  # the words leading up to the year, in the edited article
    position: int  # character offset of the year in the edited article


def _has_year(text: str, year: str) -> bool:
    return re.search(rf"(?<!\d){year}(?!\d)", text) is not None


def edit(text: str, year: str, counterfactual: str) -> str:
    """Replace every occurrence of `year` (as a whole number) by `counterfactual`."""
    return re.sub(rf"(?<!\d){year}(?!\d)", counterfactual, text)


def questions(articles: Sequence[Article], seed: int = 0, per_article: int = 3) -> list[Question]:
    """Up to `per_article` verified questions from each article, years distinct within an article."""
    rng = random.Random(seed)
    out = []
    for article in articles:
        text = article.text.lower()
        candidates: dict[str, list[tuple[str, int]]] = {}
        for sentence in _SENTENCE.finditer(text):
            for m in _YEAR.finditer(sentence.group()):
                words = sentence.group()[: m.start()].split()
                if len(words) >= MIN_PREFIX_WORDS and not _YEAR.search(" ".join(words[-PREFIX_WORDS:])):
                    candidates.setdefault(m.group(1), []).append((" ".join(words[-PREFIX_WORDS:]), m.start()))
        years = sorted(y for y, uses in candidates.items() if text.count(uses[0][0]) == 1)
        rng.shuffle(years)
        for year in years[:per_article]:
            choices = [int(year) + d for d in range(-40, 41) if abs(d) >= 3]
            choices = [str(c) for c in choices if 1200 <= c <= 2025 and not _has_year(text, str(c))]
            if not choices:
                continue
            cf = rng.choice(choices)
            prefix = candidates[year][0][0]
            edited = edit(text, year, cf)
            after = edited.find(prefix) + len(prefix)
            position = after + len(edited[after:]) - len(edited[after:].lstrip())
            question = Question(article.title, year, cf, prefix, position)
            verify_article(text, edited, question)
            out.append(question)
    return out


def verify_article(original: str, edited: str, q: Question) -> None:
    if not _has_year(original, q.year) or _has_year(original, q.counterfactual):
        raise VerificationError(f"{q.article}: {q.year} must be in the original and {q.counterfactual} not")
    if _has_year(edited, q.year) or not _has_year(edited, q.counterfactual):
        raise VerificationError(f"{q.article}: the edit must remove {q.year} and add {q.counterfactual}")
    if edited.count(q.prefix) != 1:
        raise VerificationError(f"{q.article}: the question's sentence must appear exactly once")


def item(
    q: Question,
    articles: Sequence[Article],
    length: int,
    rng: random.Random,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> Item:
    """The question asked over a document of about `length` tokens holding the edited article (cut or padded)."""
    by_title = {a.title: a for a in articles}
    edited = edit(by_title[q.article].text.lower(), q.year, q.counterfactual)
    head, tail = encode(edited[: q.position]), encode(edited[q.position :])
    if len(head) + len(tail) > length:  # cut a window of `length` tokens around the question's sentence
        hi = min(len(head), length - 8)
        lo = max(length - len(tail), min(hi, max(PREFIX_WORDS * 3, length // 20)))
        before = rng.randint(min(lo, hi), hi)
        after = length - before
        document = decode(head[len(head) - before :]) + decode(tail[:after])
    else:  # pad with other articles that mention neither year, the edited one at a random depth
        pads = [a for a in articles if a.title != q.article]
        rng.shuffle(pads)
        pads = [a for a in pads if not _has_year(a.text, q.year) and not _has_year(a.text, q.counterfactual)]
        budget = length - len(head) - len(tail)
        pad_ids: list[int] = []
        for a in pads:
            if len(pad_ids) >= budget:
                break
            pad_ids += encode(a.text.lower() + "\n\n")
        pad_ids = pad_ids[:budget]
        split = rng.randint(0, len(pad_ids))
        before_text, after_text = decode(pad_ids[:split]), decode(pad_ids[split:])
        document = f"{before_text}\n\n{edited}\n\n{after_text}".strip()
    answer_at = document.find(q.prefix)
    if answer_at < 0 or _has_year(document, q.year) or not _has_year(document, q.counterfactual):
        raise VerificationError(f"{q.article}/{q.year}: the document lost the sentence or kept the true year")
    return Item(
        task="wikiqa",
        id=f"wikiqa-{length}-{q.article}-{q.year}",
        length=length,
        depth=round(answer_at / max(1, len(document)), 3),
        document=document,
        question=f'Complete this sentence from the article about {q.article.lower()}: "{q.prefix} ..."',
        answer_prefix=f'Answer: "{q.prefix}',
        answers=[q.counterfactual],
        scorer="any",
        max_new_tokens=30,
        meta={"article": q.article, "true_answer": q.year, "article_tokens": len(head) + len(tail)},
    )


def spread(qs: Sequence[Question], n: int) -> list[Question]:
    """n questions taking one per article in turn, so a small n still covers many articles."""
    by_article: dict[str, list[Question]] = {}
    for q in qs:
        by_article.setdefault(q.article, []).append(q)
    out: list[Question] = []
    rounds = max((len(v) for v in by_article.values()), default=0)
    for r in range(rounds):
        out += [v[r] for v in by_article.values() if r < len(v)]
    return out[:n]
