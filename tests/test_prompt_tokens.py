"""The TUI's torch-free token counter against transformers' CLIPTokenizer (what the worker encodes with)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tui_diffusion import prompt_tokens
from tui_diffusion.pipeline.prompt_weights import weighted_chunks
from tui_diffusion.widgets.prompt_editor import EMBEDDING, EMPHASIS, WEIGHT, prompt_highlights

PROMPTS = [
    "", "a photo of a cat", "Masterpiece, (best quality:1.2), 8k UHD,  hyper-detailed!!",
    "café naïve Ünïcödé 日本語 emoji 🎨🖌️", "don't they'll we've I'm", "tab\tnew\nline   spaces",
    "1234567890 3.14 $5 #hashtag @user", "((emphasis)) [brackets] \\(escaped\\) {braces}",
    "supercalifragilisticexpialidocious " * 4, "<|endoftext|> inside", "ÀÉÎÕÜ ß ﬁ ligature",
]


@pytest.fixture(scope="module")
def reference():  # noqa: ANN201
    from transformers import CLIPTokenizer

    from tui_diffusion.modelfiles.configs import package_config_dir

    folder = package_config_dir("clip_tokenizer")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_the_real_tokenizer(reference, text: str) -> None:
    assert prompt_tokens.token_ids(text) == reference(text, add_special_tokens=False).input_ids


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_ids_match_the_real_tokenizer_on_any_text(reference, text: str) -> None:
    assert prompt_tokens.token_ids(text) == reference(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", [*PROMPTS, "a (red:1.3) cat, " * 30, "word " * 80, "x" * 500])
def test_chunk_counts_are_what_the_worker_encodes(reference, text: str) -> None:
    """The windows the worker builds with the real tokenizer, counted without start, end and padding."""
    tok = reference
    # start, end and padding as markers no tokenizer returns: what is left is the text's tokens
    chunks = weighted_chunks(text, lambda w: tok(w, add_special_tokens=False).input_ids, -1, -2, -3, 77)
    expected = [sum(1 for t, _ in c if t >= 0) for c in chunks]
    assert prompt_tokens.chunk_counts(text) == expected


def test_long_prompt_counts_per_window() -> None:
    counts = prompt_tokens.chunk_counts("word " * 80)
    assert counts == [75, 5]
    assert prompt_tokens.describe_counts(counts) == "80 tokens in 2 chunks: 75/75 · 5/75"
    assert prompt_tokens.describe_counts([3]) == "3/75 tokens"


def test_counting_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys\nfrom tui_diffusion import prompt_tokens\nprompt_tokens.load()\n"
            "assert prompt_tokens.chunk_counts('a (red:1.2) cat') == [3]\n"
            "print(','.join(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_prompt_highlights_weights_emphasis_and_embeddings() -> None:
    line = "a (red:1.2) ((big)) \\(lit\\) embedding:night, (x)"
    spans = {(line[s:e], name) for s, e, name in prompt_highlights(line)}
    assert ("(", WEIGHT) in spans and (":1.2)", WEIGHT) in spans
    assert ("embedding:night", EMBEDDING) in spans
    assert sum(1 for text, name in spans if name == EMPHASIS) >= 2  # (( )) and (x)
    assert not any("lit" in text for text, _ in spans)  # escaped brackets are text
