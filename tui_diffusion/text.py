"""Names from disk and from workflows, made safe to print: a file called ``a\\x1b]0;PWN\\x07b.safetensors``
must not retitle (or worse, reprogram) the user's terminal. Torch-free and dependency-free."""

from __future__ import annotations

import unicodedata

#: Unicode's bidirectional controls: they reorder what follows them on screen ("Trojan source")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: control characters (C0, DEL, C1), lone surrogates (undecodable bytes of a file name), line separators
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``), so that what
    reaches a terminal is exactly what is shown; ``keep_newlines`` leaves ``\\n`` alone (multi-line
    messages). Call it wherever a name from a file, a folder or a workflow is shown."""
    text = str(text)
    if text.isprintable():  # the common case: nothing to do
        return text
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in _BIDI or unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
