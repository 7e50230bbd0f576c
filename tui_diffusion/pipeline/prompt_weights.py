"""ComfyUI's prompt syntax: ``(word:1.2)``, ``((word))``, escaped ``\\(``/``\\)``; and its chunking of long
prompts into windows of the text encoder's length. Torch-free: works on token ids and weights.

``[word]`` is plain text (ComfyUI gives square brackets no weight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"
MAX_WORD_LENGTH = 8  # a word of at least this many tokens may be split across chunks


def _escape(text: str) -> str:
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _split_parentheses(text: str) -> list[str]:
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, w)
        else:
            out.append((part, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) segments, escapes resolved."""
    return [(_unescape(t), w) for t, w in _weights(_escape(text), 1.0)]


def weighted_chunks(text: str, tokenize: Callable[[str], list[Any]], bos: int, eos: int, pad: int,
                    length: int = 77) -> list[list[tuple[Any, float]]]:
    """Token windows of ``length`` (BOS ... EOS pad...), each token with its weight, as ComfyUI builds them.

    Words are kept whole within a window unless they are very long; the first window exists even for an
    empty prompt. ``tokenize`` maps a word to token ids, or to other items (embedding vectors) that take a
    token's place.
    """
    words: list[list[tuple[Any, float]]] = []
    for segment, weight in parse_weights(text):
        for word in segment.replace("\n", " ").split(" "):
            if word:
                words.append([(t, weight) for t in tokenize(word)])
    chunks: list[list[tuple[int, float]]] = []
    chunk: list[tuple[int, float]] = [(bos, 1.0)]
    chunks.append(chunk)
    for group in words:
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(chunk) > length - 1:
                room = length - len(chunk) - 1
                if is_large:
                    chunk.extend(group[:room])
                    chunk.append((eos, 1.0))
                    group = group[room:]
                else:
                    chunk.append((eos, 1.0))
                    chunk.extend([(pad, 1.0)] * room)
                chunk = [(bos, 1.0)]
                chunks.append(chunk)
            else:
                chunk.extend(group)
                group = []
    chunk.append((eos, 1.0))
    chunk.extend([(pad, 1.0)] * (length - len(chunk)))
    return chunks
