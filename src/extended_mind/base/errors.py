"""Errors a user can act on. Each message names the problem; none should surface as a torch traceback."""

from __future__ import annotations


class ExtendedMindError(ValueError):
    """Base class for every error the library raises on bad input."""


class DocumentError(ExtendedMindError):
    """A document is empty, binary, unreadable or missing."""


class ModelLoadError(ExtendedMindError):
    """A model could not be found or loaded."""


class MemoryFileError(ExtendedMindError):
    """A saved memory is missing, corrupt or of an unknown format."""


class MemoryConflictError(MemoryFileError):
    """A saved memory was changed by another writer after the copy being saved was loaded."""


class MemoryMismatchError(ExtendedMindError):
    """A memory was built by a different model than the one asked to use it."""


class PromptTooLongError(ExtendedMindError):
    """A prompt does not fit in the model's context window."""
