"""Read a safetensors header without loading any tensor, and refuse files whose header lies."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


class CheckpointError(Exception):
    """A model file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (bad entry for {name!r})") from None
        count = 1
        for d in shape:
            count *= d
        if dtype not in _DTYPE_SIZES or not 0 <= start <= end or end - start != count * _DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name!r})")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of a {data_len}-byte data section"
            )
        out[name] = TensorInfo(dtype, shape)
    return out
