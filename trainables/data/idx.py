"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed.

Header: two zero bytes, a type code, the number of dimensions, then each dimension as a
big-endian uint32; the data follows in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it is gzip (recognised by content, not by name)."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc}); delete the file and fetch it again") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise DataError(
            f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}; "
            "expected 0000 followed by a type code and the number of dimensions)"
        )
    dtype = np.dtype(_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated ({len(data)} bytes, {ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{source}: IDX size mismatch: header says shape {shape} of {dtype.str} "
            f"({expected} bytes in all) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(read_bytes(path), str(path))
