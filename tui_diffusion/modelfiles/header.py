"""Read a safetensors header without loading any tensor, and refuse files whose header lies."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

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
        stat = path.stat()
        if not S_ISREG(stat.st_mode):  # a FIFO would block the read forever
            raise CheckpointError(f"{path}: not a regular file")
        size = stat.st_size
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
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, or an integer of over 4300 digits
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON it can read)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a safetensors file (its header is nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = _entry(info)
        if entry is None:
            raise CheckpointError(f"{path}: not a safetensors file (bad entry for {name!r})")
        dtype, shape, start, end = entry
        count = 0 if 0 in shape else 1
        for d in shape if count else ():
            count *= d
            if count >= 2**64:  # past any offset the file can hold: stop before the product gets huge
                break
        if dtype not in _DTYPE_SIZES or not 0 <= start <= end or end - start != count * _DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name!r})")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of a {data_len}-byte data section"
            )
        out[name] = TensorInfo(dtype, shape)
    return out


def _is_count(value: object) -> bool:
    """A JSON integer that can be a size or an offset: not a string, a float or a bool; 0 to 2**64 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _entry(info: object) -> tuple[str, tuple[int, ...], int, int] | None:
    """dtype, shape and data offsets of one header entry, or None when any is not what the format says
    (a string offset such as ``"16"`` compared with a number would otherwise raise a TypeError)."""
    if not isinstance(info, dict):
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if len(offsets) != 2 or not all(_is_count(v) for v in offsets) or not all(_is_count(d) for d in shape):
        return None
    return dtype, tuple(shape), offsets[0], offsets[1]


def require_rank(path: str | Path, header: dict[str, TensorInfo], name: str, rank: int) -> TensorInfo | None:
    """The tensor ``name`` when the file has it, checked to have ``rank`` dimensions: a crafted file with a
    1-D conv weight fails here, naming the file, instead of with an IndexError deep in the loader."""
    info = header.get(name)
    if info is not None and len(info.shape) != rank:
        raise CheckpointError(f"{path}: not a usable checkpoint: tensor {name!r} has shape {list(info.shape)}, "
                              f"expected {rank} dimensions")
    return info
