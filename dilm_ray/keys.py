"""Content keys for caches and records: a short hex digest of everything a value depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def content_key(*parts: Any, length: int = 16) -> str:
    """SHA-1 of the parts as canonical JSON (sorted keys), ``length`` hex characters.

    Parts must be JSON-serialisable (config dumps, strings, numbers, lists); pass every input
    the keyed value depends on, and nothing machine-specific such as absolute paths.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (64 hex characters), read in 4 MiB blocks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def texts_digest(texts, labels) -> str:
    """SHA-256 over rows of text fields and their labels: the identity of a labelled set."""
    h = hashlib.sha256()
    for row, label in zip(texts, labels):
        h.update(json.dumps([list(row), int(label)], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
