"""Cheap content fingerprints of data files and the `identity` string built from them.

A file is summarised by its name, its size and a hash of its first and last MiB: fast on large
files and enough to tell different downloads apart. Directory paths are left out, so the same
files in another place give the same identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

MIB = 1 << 20
# Bump when the way data is produced from the files changes, so cached results are not reused.
FORMAT_VERSION = 1


def files_fingerprint(paths: Iterable[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths, key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(MIB))
            if size > MIB:
                f.seek(max(MIB, size - MIB))
                digest.update(f.read(MIB))
    return digest.hexdigest()


def listing_fingerprint(entries: Iterable[tuple[str, int]]) -> str:
    """Fingerprint of a tree of many small files from (relative path, size) pairs, no content read."""
    digest = hashlib.blake2b(digest_size=16)
    for rel, size in sorted(entries):
        digest.update(f"{rel}\0{size}\n".encode())
    return digest.hexdigest()


def data_identity(dataset: str, fingerprint: str, seed: int, **settings: object) -> str:
    """'<dataset>-<16 hex>' determined by the files, the settings that shape the data, and the seed."""
    payload = json.dumps(
        {"format": FORMAT_VERSION, "dataset": dataset, "files": fingerprint, "seed": seed, **settings},
        sort_keys=True,
    )
    return f"{dataset}-{hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()}"
