"""Errors a node raises for bad input: shown to the user as one line, without a traceback."""

from __future__ import annotations


class NodeError(Exception):
    """A problem with a node's input that the user can fix (the message says what)."""


class Interrupted(Exception):
    """The job was interrupted by the client."""
