"""ComfyUI's prompt syntax and long-prompt chunking (token counts and boundaries asserted)."""

from __future__ import annotations

import pytest

from tui_diffusion.pipeline.prompt_weights import parse_weights, weighted_chunks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat:1.5) sat", [("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]),
        ("((cat))", [("cat", pytest.approx(1.21))]),
        ("(cat)", [("cat", pytest.approx(1.1))]),
        ("[cat]", [("[cat]", 1.0)]),
        ("a \\(cat\\) b", [("a (cat) b", 1.0)]),
        ("(red (hat:2):0.5)", [("red ", 0.5), ("hat", 2.0)]),
        ("(a:b)", [("a:b", pytest.approx(1.1))]),
        ("", []),
    ],
)
def test_parse_weights(text: str, expected: list) -> None:
    assert parse_weights(text) == expected


def fake_tokenize(word: str) -> list[int]:
    return [1000 + len(word)] * (1 + len(word) // 4)  # longer words: more tokens


def test_empty_prompt_is_one_window_of_bos_eos_pad() -> None:
    (chunk,) = weighted_chunks("", fake_tokenize, bos=1, eos=2, pad=3, length=10)
    assert [t for t, _ in chunk] == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]


def test_weights_follow_their_tokens() -> None:
    (chunk,) = weighted_chunks("ab (cd:1.5)", fake_tokenize, bos=1, eos=2, pad=3, length=10)
    assert chunk[:4] == [(1, 1.0), (1002, 1.0), (1002, 1.5), (2, 1.0)]


def test_long_prompts_split_into_windows_of_length_without_breaking_words() -> None:
    text = " ".join(["abcd"] * 40)  # each word is 2 tokens: 80 tokens
    chunks = weighted_chunks(text, fake_tokenize, bos=1, eos=2, pad=3, length=77)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    first = [t for t, _ in chunks[0]]
    assert first[0] == 1 and first.count(1004) == 74 and first[75] == 2 and first[76] == 3  # 37 whole words
    second = [t for t, _ in chunks[1]]
    assert second.count(1004) == 6 and second[7] == 2


def test_very_long_words_are_split_across_windows() -> None:
    chunks = weighted_chunks("x" * 60, fake_tokenize, bos=1, eos=2, pad=3, length=10)  # one word, 16 tokens
    assert [len(c) for c in chunks] == [10, 10]
    assert [t for t, _ in chunks[0]] == [1] + [1060] * 8 + [2]
