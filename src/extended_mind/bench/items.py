"""What every benchmark task produces (items) and how an answer is scored."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field


@dataclass
class Item:
    """One question about one document. Methods see `document`, `question` and `answer_prefix`; never `answers`."""

    task: str
    id: str
    length: int  # target document length in tokens (the bucket it is reported in)
    document: str
    question: str
    answer_prefix: str  # text the answer continues (small models answer best in the document's own words)
    answers: list[str]
    scorer: str  # a key of SCORERS
    max_new_tokens: int
    depth: float | None = None  # where the asked fact sits in the document, 0 = start, 1 = end
    meta: dict = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        if self.scorer == "unmixed":  # the asked document's fact, and no other document's
            return score_unmixed(prediction, self.answers, self.meta["others"])
        return SCORERS[self.scorer](prediction, self.answers)

    def record(self) -> dict:
        """The item as results.json keeps it (without the document, which can be megabytes)."""
        out = asdict(self)
        out.pop("document")
        return out


_INTEGER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|\.\d)")


def first_integer(prediction: str) -> int | None:
    """The first whole number in `prediction`, thousands separators allowed ("12,345"); digits glued to letters
    ("v2", "42nd") or parts of decimals ("3.5") do not count."""
    m = _INTEGER.search(prediction)
    return int(m.group(1).replace(",", "")) if m else None


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: "St. Louis," and "st louis" compare equal."""
    text = re.sub(r"[^\w\s]|_", " ", text.lower())
    return " ".join(text.split())


def mentions(prediction: str, answer: str) -> bool:
    """`answer` appears in `prediction` as whole words (after normalize): "1865" is not found in "18650"."""
    needle = normalize(answer)
    if not needle:
        return False
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", normalize(prediction)) is not None


def score_first_integer(prediction: str, answers: list[str]) -> float:
    value = first_integer(prediction)
    return float(value is not None and any(value == int(a) for a in answers))


def score_any(prediction: str, answers: list[str]) -> float:
    return float(any(mentions(prediction, a) for a in answers))


def score_fraction(prediction: str, answers: list[str]) -> float:
    return sum(mentions(prediction, a) for a in answers) / len(answers) if answers else 0.0


def score_first_word(prediction: str, answers: list[str]) -> float:
    """The answer is the prediction's first word (a label, not a mention somewhere in a ramble)."""
    words = normalize(prediction).split()
    return float(bool(words) and any(words[0] == normalize(a) for a in answers))


def score_unmixed(prediction: str, answers: list[str], others: list[str]) -> float:
    return float(score_any(prediction, answers) == 1.0 and not any(mentions(prediction, o) for o in others))


def mixes(prediction: str, others: list[str]) -> bool:
    return any(mentions(prediction, o) for o in others)


SCORERS = {
    "first_integer": score_first_integer,
    "any": score_any,
    "fraction": score_fraction,
    "first_word": score_first_word,
}
