"""Command line: `extended-mind memorize|ask|chat|memory|serve|demo|bench|tune|data`."""

from extended_mind.cli.launch import main

__all__ = ["main"]
