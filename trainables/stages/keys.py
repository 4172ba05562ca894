"""Stage keys: content addresses for stage outputs.

A stage's key is a hash of everything that determines its output -- its kind and resolved config, its parent
stage's key, the identity of the data, the seed and the code-semantics version (`trainables.semantics`) -- so
two stages with equal keys are interchangeable and the stage store can reuse one for the other, across trials,
studies and restarts.

Guarantees:
- Same inputs give the same key in any process, on any machine and Python run (canonical JSON: sorted keys, no
  whitespace, tuples as lists, floats by their shortest round-trip ``repr``; no dependence on hash randomisation).
- Any change to any input gives a different key. Note that ``1`` and ``1.0`` are different values here, as are
  ``0.0`` and ``-0.0``: keys err on the side of recomputing, never of wrongly reusing.
- Only JSON-like values are hashed. Anything else raises ``TypeError`` naming where it sits (e.g.
  ``config.optim.betas[1]``), so an object's ``repr`` (which may contain a memory address, or hide the values that
  matter) can never become part of a key by accident. NumPy scalars are accepted as their Python value.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from ..semantics import SEMANTICS_VERSION

__all__ = ["stage_key", "canonical_json", "KEY_RE"]

# Bump when the hashed payload changes shape, so old store entries are not mistaken for new ones.
_SCHEMA = 1
_DIGEST_CHARS = 20
_KIND_RE = re.compile(r"^[A-Za-z0-9_]+$")
# Keys are used as directory names in the store; this is what a stage key (or any key the store accepts) looks like.
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _normalise(value: Any, path: str) -> Any:
    """Return a plain-JSON copy of ``value``, or raise TypeError naming ``path``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):  # IntEnum/StrEnum would otherwise pass as int/str and hide the enum
        raise TypeError(f"{path}: enum {value!r} is not JSON-like; use its .value")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                # json.dumps would turn 1 into "1" and make {1: x} and {"1": x} collide.
                raise TypeError(f"{path}: mapping key {k!r} is {type(k).__name__}, not str")
            out[k] = _normalise(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _normalise(value.item(), path)
    raise TypeError(f"{path}: {type(value).__qualname__} value {value!r:.80} is not JSON-like "
                    "(allowed: None, bool, int, float, str, list, tuple, mapping with str keys)")


def canonical_json(value: Any, path: str = "value") -> str:
    """Canonical JSON text of a JSON-like value (sorted keys, no whitespace, ASCII only)."""
    return json.dumps(_normalise(value, path), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True)


def stage_key(kind: str, config: Mapping, parent_key: str | None, data_identity: str, seed: int,
              semantics: int = SEMANTICS_VERSION) -> str:
    """Key of a stage: ``"<kind>-<first 20 hex chars of sha256(canonical inputs)>"``.

    `semantics` is the code-semantics version; only `why_recomputed` passes an older one (to recognise stages
    stored by older code)."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"kind must be a non-empty string of letters, digits and '_', got {kind!r}")
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
    if parent_key is not None and not isinstance(parent_key, str):
        raise TypeError(f"parent_key: expected str or None, got {type(parent_key).__name__}")
    if not isinstance(data_identity, str):
        raise TypeError(f"data_identity: expected str, got {type(data_identity).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    payload = {
        "schema": _SCHEMA,
        "kind": kind,
        "config": _normalise(config, "config"),
        "parent": parent_key,
        "data": data_identity,
        "seed": int(seed),
        "semantics": int(semantics),
    }
    digest = hashlib.sha256(canonical_json(payload, "stage").encode("ascii")).hexdigest()
    return f"{kind}-{digest[:_DIGEST_CHARS]}"
