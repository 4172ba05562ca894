"""The version of the code semantics that stage outputs depend on: it enters every stage key.

Bump `SEMANTICS_VERSION` whenever a change to the files in `SEMANTICS_SOURCES` (models, losses, the training loop,
the stage procedure and its helpers, the data transforms) can change what a stage computes: stages stored under an
older version are then recomputed, never silently reused. `tests/test_semantics.py` records a digest of these
files next to the version and fails when the code changes without a bump (comments, docstrings and formatting
do not count: the digest is taken over the syntax tree without docstrings).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

SEMANTICS_VERSION = 3

_ROOT = Path(__file__).resolve().parent
SEMANTICS_SOURCES = (
    "models/augmented.py", "models/decoders.py", "models/factory.py", "models/groups.py", "models/skip_ae.py",
    "models/vgg.py", "losses.py", "stages/loop.py", "stages/procedure.py", "stages/lr_probe.py",
    "stages/balance.py", "data/folders.py", "data/loading.py", "data/memory.py",
)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def semantics_digest() -> str:
    """sha256 over the syntax trees (docstrings removed) of SEMANTICS_SOURCES: changes only with the code's meaning."""
    h = hashlib.sha256()
    for rel in SEMANTICS_SOURCES:
        tree = _strip_docstrings(ast.parse((_ROOT / rel).read_text(), rel))
        h.update(rel.encode() + b"\0" + ast.dump(tree, include_attributes=False).encode() + b"\0")
    return h.hexdigest()[:16]
