"""Token counts of a prompt, per 77-token window, as the text encoder will see them; torch-free.

The CLIP tokenizer is rebuilt from the shipped ``vocab.json``/``merges.txt`` with the ``tokenizers`` package
(the same normaliser, pre-tokeniser and BPE model transformers' ``CLIPTokenizer`` sets up), so the TUI process
counts exactly what the worker will encode without importing transformers. Windows follow ComfyUI's chunking
(``weighted_chunks``): weight syntax removed, words kept whole within a window of 75 tokens plus start and end.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from tui_diffusion.pipeline.prompt_weights import weighted_chunks

CONTEXT = 77
EMBEDDING_PREFIX = "embedding:"
_lock = threading.Lock()


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from importlib import resources

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    folder = Path(str(resources.files("tui_diffusion.configs").joinpath("clip_tokenizer")))
    model = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), dropout=None,
                          continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                          unk_token="<|endoftext|>")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tok


def load() -> None:
    """Build the tokenizer now (about a tenth of a second): call it off the UI thread before counting."""
    with _lock:
        _tokenizer()


def loaded() -> bool:
    return _tokenizer.cache_info().currsize > 0


def token_ids(text: str) -> list[int]:
    """The ids of ``text`` without start and end tokens (what ``tokenizer(text, add_special_tokens=False)``
    gives)."""
    return _tokenizer().encode(text, add_special_tokens=False).ids


def chunk_counts(text: str) -> list[int]:
    """Tokens in each 77-token window of the prompt (start, end and padding not counted).

    An ``embedding:name`` word counts as one token: how many vectors it holds is known only once the worker
    reads the file.
    """
    def tokenize(word: str) -> list[Any]:
        return [None] if word.startswith(EMBEDDING_PREFIX) else token_ids(word)

    chunks = weighted_chunks(text, tokenize, -1, -2, -3, CONTEXT)
    return [sum(1 for t, _ in chunk if t not in (-1, -2, -3)) for chunk in chunks]


def describe_counts(counts: list[int], has_embedding: bool = False) -> str:
    """The line under a prompt: "12/75 tokens", or each window's count for a long prompt."""
    room = CONTEXT - 2
    if len(counts) == 1:
        text = f"{counts[0]}/{room} tokens"
    else:
        text = f"{sum(counts)} tokens in {len(counts)} chunks: " + " · ".join(f"{c}/{room}" for c in counts)
    return text + (" (an embedding counts as 1)" if has_embedding else "")
