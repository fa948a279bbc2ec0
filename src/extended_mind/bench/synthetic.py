"""Generated long-context tasks: passkey, needle in a haystack and RULER-style needles and variable tracking.

Every generator is deterministic in (seed, length, depth) and builds a document of about `length` tokens of the
model's tokenizer: haystack sentences are counted once and added until the budget is spent, needles are inserted
between sentences at their depth."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from extended_mind.bench.items import Item

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEPTHS = (0.1, 0.5, 0.9)

CountTokens = Callable[[str], int]


class Haystack:
    """Sentences to fill documents with, each counted in tokens once."""

    def __init__(self, text: str, count: CountTokens):
        self.sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        if not self.sentences:
            raise ValueError("empty haystack")
        self.count = count
        self._sizes: dict[int, int] = {}

    def size(self, i: int) -> int:
        j = i % len(self.sentences)
        if j not in self._sizes:
            self._sizes[j] = self.count(" " + self.sentences[j])
        return self._sizes[j]

    def fill(self, tokens: int, start: int = 0) -> list[str]:
        """Consecutive sentences (wrapping around) from `start` adding up to about `tokens` tokens."""
        out, used, i = [], 0, start
        while used < tokens:
            out.append(self.sentences[i % len(self.sentences)])
            used += self.size(i)
            i += 1
        return out


def place(sentences: list[str], needles: Sequence[tuple[float, str]]) -> str:
    """Insert each (depth, sentence) needle between haystack sentences at that fraction of the document."""
    out = list(sentences)
    for depth, needle in sorted(needles, key=lambda x: -x[0]):  # from the end, so earlier indices stay valid
        out.insert(round(depth * len(sentences)), needle)
    return " ".join(out)


def _budget(length: int, needles: Sequence[str], count: CountTokens) -> int:
    return max(1, length - sum(count(" " + n) for n in needles))


def passkey(length: int, depth: float, rng: random.Random, count: CountTokens) -> Item:
    """The landmark-attention / YaRN passkey test: a number hidden in repeated filler."""
    key = rng.randint(1, 50000)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = Haystack(PASSKEY_FILLER, count).fill(_budget(length, [needle], count))
    return Item(
        task="passkey", id=f"passkey-{length}-{depth:.2f}-{key}", length=length, depth=depth,
        document=place(hay, [(depth, needle)]), question="What is the pass key?", answer_prefix="The pass key is",
        answers=[str(key)], scorer="first_integer", max_new_tokens=8,
    )  # fmt: skip


def prose_passkey(length: int, depth: float, rng: random.Random, count: CountTokens, prose: str) -> Item:
    """The passkey sentence in real prose (Wikipedia articles) instead of repeated filler: the key must be found
    among tokens that all look like text worth reading."""
    key = rng.randint(10000, 99999)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = Haystack(prose, count)
    start = rng.randrange(len(hay.sentences))
    sentences = hay.fill(_budget(length, [needle], count), start)
    return Item(
        task="passkey-prose", id=f"passkey-prose-{length}-{depth:.2f}-{key}", length=length, depth=depth,
        document=place(sentences, [(depth, needle)]), question="What is the pass key?",
        answer_prefix="The pass key is", answers=[str(key)], scorer="first_integer", max_new_tokens=8,
    )  # fmt: skip


def niah(length: int, depth: float, rng: random.Random, count: CountTokens, essays: str) -> Item:
    """Needle in a haystack of Paul Graham's essays (the original test's needle and question)."""
    hay = Haystack(essays, count)
    start = rng.randrange(len(hay.sentences))
    sentences = hay.fill(_budget(length, [NIAH_NEEDLE], count), start)
    return Item(
        task="niah", id=f"niah-{length}-{depth:.2f}-{start}", length=length, depth=depth,
        document=place(sentences, [(depth, NIAH_NEEDLE)]),
        question="What is the best thing to do in San Francisco?",
        answer_prefix="The best thing to do in San Francisco is", answers=["sandwich", "dolores park"],
        scorer="any", max_new_tokens=24,
    )  # fmt: skip


RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")


def ruler(
    kind: str, length: int, rng: random.Random, count: CountTokens, essays: str, nouns: list[str], adjectives: list[str]
) -> Item:
    """RULER-style tasks (Hsieh et al. 2024) over an essay haystack: one needle; the asked key among distractor
    keys; one key with several values; several keys asked at once; and a chain of variable assignments."""
    if kind not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {kind!r}; choose from {RULER_TASKS}")
    if len(nouns) * len(adjectives) < 4:
        raise ValueError("RULER keys need at least 4 distinct adjective-noun pairs")
    hay = Haystack(essays, count)
    start = rng.randrange(len(hay.sentences))

    def key() -> str:
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"

    def value() -> str:
        return str(rng.randint(1_000_000, 9_999_999))

    def needle(k: str, v: str) -> str:
        return f"One of the special magic numbers for {k} is: {v}."

    if kind == "variable_tracking":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        v = str(rng.randint(10000, 99999))
        needles = [f"VAR {names[0]} = {v}."] + [f"VAR {b} = {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
        question = f"Find all variables that are assigned the value {v} in the text above."
        prefix = (f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
                  f"variables are assigned the value {v}, they are:")  # fmt: skip
        answers, scorer, max_new = names, "fraction", 40
    else:
        keys = [key() for _ in range(4)]
        while len(set(keys)) < 4:
            keys = [key() for _ in range(4)]
        if kind == "niah_single":
            pairs = [(keys[0], value())]
            asked, answers = [keys[0]], [pairs[0][1]]
        elif kind == "niah_multikey":
            pairs = [(k, value()) for k in keys]
            asked, answers = [keys[0]], [pairs[0][1]]
        elif kind == "niah_multivalue":
            pairs = [(keys[0], value()) for _ in range(4)]
            asked, answers = [keys[0]], [v for _, v in pairs]
        else:  # niah_multiquery
            pairs = [(k, value()) for k in keys]
            asked, answers = keys, [v for _, v in pairs]
        needles = [needle(k, v) for k, v in pairs]
        depths = [rng.uniform(0.05, 0.95) for _ in needles]
        many = len(answers) > 1
        what = "all the special magic numbers" if many else "the special magic number"
        for_ = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
        question = f"What {'are' if many else 'is'} {what} for {for_} mentioned in the provided text?"
        prefix = (f"The special magic number{'s' if many else ''} for {for_} mentioned in the provided text "
                  f"{'are' if many else 'is'}")  # fmt: skip
        scorer, max_new = ("fraction" if many else "any"), 16 * len(answers)
    sentences = hay.fill(_budget(length, needles, count), start)
    return Item(
        task="ruler", id=f"{kind}-{length}-{start}", length=length, depth=depths[0],
        document=place(sentences, list(zip(depths, needles))), question=question, answer_prefix=prefix,
        answers=answers, scorer=scorer, max_new_tokens=max_new, meta={"kind": kind},
    )  # fmt: skip
