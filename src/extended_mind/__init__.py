"""extended-mind: Extended Mind Transformers for any transformers decoder — memory attention with citations."""

from .citations import Citation
from .documents import Document
from .errors import (
    DocumentError,
    ExtendedMindError,
    MemoryFileError,
    MemoryMismatchError,
    ModelLoadError,
    PromptTooLongError,
)
from .generation import GeneratedToken, GenerationResult, Retrieval
from .memory import Memory
from .mind import ExtendedMind

__all__ = [
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
__version__ = "0.1.0"
