"""The content words of a text (lowercased, stopwords and single letters dropped, plurals folded): what block memory
checks a relevant block shares with the question (blocks.BlockPlan.choose). The retrieval heads look for text to
copy; a list that draws them strongly for any question of a kind (a state's "State song:" line for capital
questions) shares no word with the question, while the passage a question is about almost always does (a name, the
thing asked for)."""

from __future__ import annotations

import re

# English function words (the common stopword lists' core): sharing one says nothing about relevance
STOPWORDS = frozenset(
    """
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing done down during each either else ever every few for from further get gets got
had has have having he her here hers herself him himself his how i if in into is it its itself just know known let
like make made many may me might more most much must my myself neither no nor not now of off on once one only or
other our ours ourselves out over own please same say says she should so some such tell than that the their theirs
them themselves then there these they this those through to too two under until up upon us very was we were what
when where which while who whom whose why will with within without would yes yet you your yours yourself yourselves
""".split()
)

_WORD = re.compile(r"\w+")


def content_words(text: str) -> frozenset[str]:
    """Lowercased words of `text` that are not stopwords or single letters, a plural "s" taken off."""
    out = set()
    for w in _WORD.findall(text.casefold()):
        if w in STOPWORDS or (len(w) < 2 and not w.isdigit()):
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return frozenset(out)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# A one-word question is about a text whose sentences name that word this often ("aardwolf" in 30 of an article's
# 114 sentences); a word said in passing ("continent", once) is not what the text is about
LONE_WORD_SHARE = 0.05


def sentence_words(text: str) -> list[frozenset[str]]:
    """The content words of each sentence (or line) of `text`."""
    return [content_words(s) for s in _SENTENCE_END.split(text) if s.strip()]


def asks_about(words: frozenset[str], sentences: list[frozenset[str]]) -> bool:
    """Whether a question whose content words are `words` asks about a text of `sentences`: its words together in
    one sentence (the fact a question names: "best thing to do in San Francisco"), or a lone word in at least
    LONE_WORD_SHARE of them. A general question's words are often all in a text of some length, but apart ("day"
    and "week" in different sentences of an article); a question with no content word ("Who are you?") names
    nothing the text holds."""
    if len(words) == 1:
        (word,) = words
        return sum(word in s for s in sentences) >= max(1.0, LONE_WORD_SHARE * len(sentences))
    return bool(words) and any(words <= s for s in sentences)
