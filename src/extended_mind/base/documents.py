"""Turning user input (strings or text-file paths) into validated documents."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from extended_mind.base.errors import DocumentError

# A plain string is read as a path only when it looks like one: a single short line without spaces that either
# exists or ends in a file extension. Anything else is document text.
_PATH_LIKE = re.compile(r"^[^\s]{1,1024}$")


_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}$")


@dataclass(frozen=True)
class Document:
    """A memorized document: its id, a display name (file name or None) and its full text."""

    id: str
    text: str
    name: str | None = None


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, refusing missing, binary and empty files with a message naming the file."""
    if not path.exists():
        raise DocumentError(f"document path not found: {path}")
    if path.is_dir():
        raise DocumentError(f"document path is a directory, not a text file: {path}")
    return decode_text(path.read_bytes(), str(path))


def decode_text(data: bytes, name: str) -> str:
    """The UTF-8 text of a file's bytes (`name` appears in errors); binary, non-UTF-8 and empty files are refused."""
    if b"\x00" in data[:65536]:
        raise DocumentError(f"document is a binary file, not text: {name}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"document is a binary file or not UTF-8 text: {name} ({exc.reason})") from None
    if not text.strip():
        raise DocumentError(f"document is empty: {name}")
    return text


def _looks_like_path(text: str) -> bool:
    return bool(_PATH_LIKE.match(text)) and (os.path.exists(text) or bool(_EXTENSION.search(text)))


def load_documents(
    documents: str | Path | Document | list[str | Path | Document],
    ids: list[str] | None = None,
    taken: set[str] | frozenset = frozenset(),
) -> list[Document]:
    """Normalise `documents` (texts, paths and/or `Document`s) into `Document`s with unique ids. Ids default to the
    file name, else the first free "doc<n>"; ids in `taken` (already in a memory) are refused. A `Document` is
    always text, never read as a path (the server passes untrusted text this way); its id is kept unless empty."""
    items = [documents] if isinstance(documents, (str, Path, Document)) else list(documents)
    if not items:
        raise DocumentError("no documents given")
    if ids is not None and len(ids) != len(items):
        raise DocumentError(f"got {len(ids)} ids for {len(items)} documents")
    out: list[Document] = []
    for i, item in enumerate(items):
        name = None
        if isinstance(item, Document):
            text, name = item.text, item.name
            if not isinstance(text, str) or not text.strip():
                raise DocumentError(f"document {item.id or i!r} is empty")
            if "\x00" in text:
                raise DocumentError(f"document {item.id or i!r} contains NUL bytes: binary data, not text")
        elif isinstance(item, Path) or (isinstance(item, str) and _looks_like_path(item)):
            path = Path(item)
            text, name = read_text_file(path), path.name
        elif isinstance(item, str):
            text = item
            if not text.strip():
                raise DocumentError(f"document {i} is empty")
            if "\x00" in text:
                raise DocumentError(f"document {i} contains NUL bytes: binary data, not text")
        else:
            raise DocumentError(f"document {i} must be a string or a path, got {type(item).__name__}")
        out.append(Document(id=item.id if isinstance(item, Document) else "", text=text, name=name))
    seen = set(taken)
    free = (f"doc{n}" for n in itertools.count() if f"doc{n}" not in taken)
    for i, doc in enumerate(out):
        doc_id = ids[i] if ids is not None else (doc.id or doc.name or next(free))
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise DocumentError(f"document id must be a non-empty string, got {doc_id!r}")
        if doc_id in seen:
            where = "already in the memory (use replace to change it)" if doc_id in taken else "given twice"
            raise DocumentError(f"duplicate document id {doc_id!r}: {where}; pass ids=... to name documents")
        seen.add(doc_id)
        out[i] = Document(id=doc_id, text=doc.text, name=doc.name)
    return out
