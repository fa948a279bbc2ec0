"""Rebuild src/extended_mind/data/aardwolf.txt: the Wikipedia article "Aardwolf" (from the English Wikipedia dump
sample shipped in the gensim 4.4.0 wheel) as plain text, with one fact changed to a counterfactual.

    pip download --no-deps gensim==4.4.0 -d /tmp/gensim && python scripts/build_demo_article.py /tmp/gensim/gensim-*.whl
"""

import bz2
import re
import sys
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TITLE = "Aardwolf"
# The counterfactual edit: how many termites an aardwolf eats in a night (the article says 250,000).
TRUE, FALSE = "250,000", "80,000"


def strip_wikitext(text: str) -> str:
    import html

    text = html.unescape(html.unescape(text))  # the dump escapes entities twice (&amp;nbsp;)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(5):  # nested templates and tables
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\n\1\n", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    lines = [ln.strip() for ln in text.splitlines()]
    cut = next((i for i, ln in enumerate(lines) if ln in ("See also", "References", "External links", "Notes")), None)
    return "\n".join(lines[:cut]).strip() + "\n"


def main(wheel: str) -> None:
    data = bz2.decompress(zipfile.ZipFile(wheel).read(MEMBER)).decode()
    pages = dict(re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", data, re.S))
    text = strip_wikitext(pages[TITLE])
    assert TRUE in text and FALSE not in text, "counterfactual edit must replace a present, unused word"
    text = text.replace(TRUE, FALSE)
    attribution = (
        f'Source: Wikipedia, "{TITLE}" (English Wikipedia dump sample in gensim 4.4.0), CC BY-SA 4.0,\n'
        f"https://en.wikipedia.org/wiki/Aardwolf and its page history for the authors.\n"
        f'Modified for a demo: every "{TRUE}" was replaced by "{FALSE}" (a counterfactual fact), and the wikitext\n'
        "was reduced to plain text.\n"
    )
    data_dir = Path(__file__).resolve().parent.parent / "src/extended_mind/data"
    out = data_dir / "aardwolf.txt"
    out.write_text(text)
    (data_dir / "aardwolf.ATTRIBUTION.txt").write_text(attribution)
    print(f"wrote {out} ({len(text)} characters)")


if __name__ == "__main__":
    main(sys.argv[1])
