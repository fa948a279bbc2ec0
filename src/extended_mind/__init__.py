"""extended-mind: Extended Mind Transformers for any transformers decoder — memory attention with citations."""

from extended_mind.base.documents import Document
from extended_mind.base.errors import (
    DocumentError,
    ExtendedMindError,
    MemoryFileError,
    MemoryMismatchError,
    ModelLoadError,
    PromptTooLongError,
)
from extended_mind.base.version import __version__
from extended_mind.engine.chat import ChatSession
from extended_mind.engine.decoding import GeneratedToken, GenerationResult, Retrieval
from extended_mind.engine.mind import ExtendedMind
from extended_mind.memory.citations import Citation
from extended_mind.memory.memory import Memory

__all__ = [
    "__version__",
    "ChatSession",
    "Citation",
    "Document",
    "DocumentError",
    "ExtendedMind",
    "ExtendedMindError",
    "GeneratedToken",
    "GenerationResult",
    "Memory",
    "MemoryFileError",
    "MemoryMismatchError",
    "ModelLoadError",
    "PromptTooLongError",
    "Retrieval",
]
