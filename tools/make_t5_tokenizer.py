#!/usr/bin/env python3
"""Derive T5's Hugging Face ``tokenizer.json`` (Unigram, 32,100 pieces) offline, for the SD3 and Flux text side.

Source: the source distribution of ``stable-diffusion-cpp-python`` on the package index, which vendors
stable-diffusion.cpp (MIT licence). Its ``src/tokenizers/vocab/clip_t5.hpp`` holds T5's tokenizer as a
``tokenizer.json`` written out as a C byte array named ``t5_tokenizer_json_str``. T5's vocabulary itself is
Apache-2.0 (Google's T5 release). No download from the Hugging Face hub is involved.

Get the source distribution with:
    pip download --no-deps --no-binary :all: stable-diffusion-cpp-python==0.4.7 -d dl

Then:
    python tools/make_t5_tokenizer.py dl/stable_diffusion_cpp_python-0.4.7.tar.gz \
        --out tui_diffusion/configs/t5_tokenizer [--check]

The script also writes the small files transformers' ``T5TokenizerFast`` reads beside ``tokenizer.json``
(``tokenizer_config.json`` and ``special_tokens_map.json``), with T5's usual settings (100 sentinel tokens,
``</s>`` end, ``<pad>`` padding, ``<unk>``).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

ARRAY_NAME = "t5_tokenizer_json_str"
HEADER_SUFFIX = "src/tokenizers/vocab/clip_t5.hpp"
EXPECTED_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]  # "a photo of a cat", as T5's own tokenizer gives it


def read_header(source: Path) -> str:
    """The text of ``clip_t5.hpp`` from the sdist (.tar.gz) or from the header file itself."""
    if source.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(source) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(HEADER_SUFFIX))
            data = tar.extractfile(member)
            assert data is not None
            return data.read().decode("ascii")
    return source.read_text("ascii")


def extract_array(header: str, name: str = ARRAY_NAME) -> bytes:
    """The bytes of the C array ``name`` (``static const unsigned char name[] = { 0x.., ... };``)."""
    start = header.index(f"{name}[]")
    body_start = header.index("{", start) + 1
    body_end = header.index("}", body_start)
    values = re.findall(r"0x([0-9a-fA-F]{2})", header[body_start:body_end])
    return bytes(int(v, 16) for v in values)


def tokenizer_config() -> dict:
    """What ``T5TokenizerFast.from_pretrained`` needs beside tokenizer.json (T5's published settings)."""
    extra = [f"<extra_id_{i}>" for i in range(100)]
    return {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 100,
        "additional_special_tokens": extra,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": True,
        "legacy": True,
    }


def special_tokens_map() -> dict:
    extra = [f"<extra_id_{i}>" for i in range(100)]
    return {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}


def write(out_dir: Path, tokenizer_json: bytes) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Re-serialise compactly (one line): same content, a smaller file in the repository.
    data = json.loads(tokenizer_json.decode("utf-8"))
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", "utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2) + "\n", "utf-8")


def check(out_dir: Path) -> None:
    """Load the result with both ``tokenizers`` and transformers and check a known encoding."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode("a photo of a cat").ids
    fast = T5TokenizerFast.from_pretrained(str(out_dir))("a photo of a cat").input_ids
    assert raw == EXPECTED_IDS, raw
    assert fast == EXPECTED_IDS, fast
    print("ok:", fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the stable-diffusion-cpp-python sdist (.tar.gz) or clip_t5.hpp")
    parser.add_argument("--out", type=Path, required=True, help="folder to write tokenizer.json and configs into")
    parser.add_argument("--check", action="store_true", help="load the result and check a known encoding")
    args = parser.parse_args()
    write(args.out, extract_array(read_header(args.source)))
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
