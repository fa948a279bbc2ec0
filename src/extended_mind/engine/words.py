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
