"""T5's tokenizer ships in the package and loads offline (issue 15, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

T5_DIR = Path(__file__).resolve().parent.parent / "tui_diffusion" / "configs" / "t5_tokenizer"


def test_known_prompt_encodes_as_t5_does() -> None:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(T5_DIR / "tokenizer.json")).encode("a photo of a cat").ids
    assert ids == [3, 9, 1202, 13, 3, 9, 1712, 1]


def test_transformers_loads_it_with_t5_special_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.T5TokenizerFast.from_pretrained(str(T5_DIR))
    assert len(tok) == 32100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 32099
    padded = tok("a cat", padding="max_length", max_length=6).input_ids
    assert padded == [3, 9, 1712, 1, 0, 0]

