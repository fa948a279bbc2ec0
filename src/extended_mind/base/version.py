"""The package version, written into saved memories."""

__version__ = "0.1.0"
