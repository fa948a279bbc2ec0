"""Many-shot in-context learning (Bertsch et al. 2024): a topic classifier learned from N demonstrations.

The sentences are real prose from the benchmark's Wikipedia articles, in four classes (countries, people, natural
science, ideas and society; several articles each). Each class is labelled with a code word drawn at random
("Text: <sentence>\\nTopic: lantern"): the codes carry no meaning, so without demonstrations the model is at chance
(1 in 4); with them it must learn which kind of sentence goes with which code. The model answers by choosing among
the four codes (each one token; OpenAI-style `logit_bias` allows only those), the usual way to score classification
with small models, which otherwise drift into a label they saw last. The same demonstration sets (nested: the 64
include the 8, and so on, balanced over the classes) serve every method; the questions are held-out sentences, the
same for every N."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from extended_mind.bench.data import Article
from extended_mind.bench.items import Item

# Classes of articles present in the benchmark's Wikipedia wheel (bench/data.py), each with 1,400+ usable sentences,
# so that 4,096 demonstrations (1,024 per class) and the questions never run out.
CLASS_GROUPS: dict[str, tuple[str, ...]] = {
    "countries": ("Albania", "Azerbaijan", "Algeria", "Afghanistan", "Angola", "Andorra", "Aruba"),
    "people": ("Abraham Lincoln", "Aristotle", "Albert Einstein", "Arthur Schopenhauer", "Andre Agassi", "Ayn Rand",
               "Andrei Tarkovsky", "Aldous Huxley", "Albert Sidney Johnston"),
    "natural science": ("Amphibian", "Alkali metal", "Alkane", "Acid", "Anatomy", "Algae", "Aardvark", "Albedo"),
    "ideas and society": ("Anarchism", "Altruism", "Abortion", "Anthropology", "Art", "Alchemy", "Ambiguity",
                          "Algorithm"),
}  # fmt: skip
WORDS = (8, 25)  # sentence length bounds, in words
UNIT_SEPARATOR = "\n\n"  # between demonstrations; RAG retrieves whole demonstrations (meta "rag_units")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(article: Article) -> list[str]:
    out = []
    for s in _SENTENCE_END.split(article.text):
        s = " ".join(s.split())
        if WORDS[0] <= len(s.split()) <= WORDS[1]:
            out.append(s)
    return out


def demonstration(sentence: str, code: str) -> str:
    return f"Text: {sentence}\nTopic: {code}"


def _codes(nouns: list[str], k: int, rng: random.Random, encode: Callable[[str], list[int]]) -> list[tuple[str, int]]:
    """k code words that are one token each after a space (so one choice picks one code), all different tokens."""
    words = sorted({w.lower() for w in nouns if w.isalpha() and 4 <= len(w) <= 9})
    rng.shuffle(words)
    out: list[tuple[str, int]] = []
    for w in words:
        ids = encode(f" {w}")
        if len(ids) == 1 and ids[0] not in {t for _, t in out}:
            out.append((w, ids[0]))
            if len(out) == k:
                return out
    raise ValueError(f"icl: fewer than {k} one-token code words in the word list")


def icl_items(
    counts: list[int],
    n: int,
    articles: tuple[Article, ...],
    nouns: list[str],
    seed: int,
    encode: Callable[[str], list[int]],
    groups: dict[str, tuple[str, ...]] = CLASS_GROUPS,
) -> list[Item]:
    """`n` questions (held-out sentences, balanced over the classes) for each demonstration count in `counts`."""
    rng = random.Random(f"{seed}-icl")
    by_title = {a.title: a for a in articles}
    missing = [t for titles in groups.values() for t in titles if t not in by_title]
    if missing:
        raise ValueError(f"icl: articles missing from the Wikipedia data: {missing}")
    classes = list(groups)
    codes = _codes(nouns, len(classes), rng, encode)
    pools = []
    for name in classes:
        sentences = list(dict.fromkeys(s for t in groups[name] for s in _sentences(by_title[t])))
        rng.shuffle(sentences)
        pools.append(sentences)
    seen: set[str] = set()  # a sentence that two classes share would leak between them: dropped from both
    shared = {s for p in pools for s in p if s in seen or seen.add(s)}
    pools = [[s for s in p if s not in shared] for p in pools]
    per_class = -(-n // len(classes))
    questions = [(c, pools[c][i]) for i in range(per_class) for c in range(len(classes))][:n]
    demos_by_class = [pool[per_class:] for pool in pools]  # never a question
    # one interleaved order over the classes: the first N of it are the N demonstrations, balanced and nested
    order = [(c, demos_by_class[c][i]) for i in range(max(map(len, demos_by_class)))
             for c in range(len(classes)) if i < len(demos_by_class[c])]  # fmt: skip
    items = []
    for count in counts:
        if count > len(order):
            raise ValueError(f"icl: at most {len(order)} demonstrations are available, asked for {count}")
        shown = order[:count]
        shuffled = random.Random(f"{seed}-icl-{count}").sample(shown, len(shown))
        document = UNIT_SEPARATOR.join(demonstration(s, codes[c][0]) for c, s in shuffled)
        for q, (c, sentence) in enumerate(questions):
            items.append(Item(
                task="icl", id=f"icl-{count}-{q}", length=count, document=document, question=f"Text: {sentence}",
                answer_prefix="Topic:", answers=[codes[c][0]], scorer="first_word", max_new_tokens=1,
                meta={"class": classes[c], "codes": [w for w, _ in codes], "choices": [t for _, t in codes],
                      "rag_units": UNIT_SEPARATOR, "shown_of_class": sum(1 for k, _ in shown if k == c)},
            ))  # fmt: skip
    return items
