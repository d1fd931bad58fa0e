"""Corpus on every machine with Python: the standard library's own ``.py`` files, split by file.

The split is a deterministic function of each file's path relative to the stdlib root (a hash), so the
same file is always in the same split; ``site-packages`` is excluded.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path
from typing import Iterator

SPLITS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def files(split: str, root: Path | None = None) -> list[Path]:
    """The stdlib ``.py`` files of ``split`` (sorted by relative path)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    out = list(_files(split, root or stdlib_root()))
    if not out:
        raise FileNotFoundError(f"no stdlib .py files found under {root or stdlib_root()} for split {split!r}")
    return out


@functools.lru_cache(maxsize=16)
def _files(split: str, root: Path) -> tuple[Path, ...]:
    """The walk of ``root`` (about a second for the stdlib), once per process and split."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel.split("/") or "dist-packages" in rel.split("/"):
            continue
        if split_of(rel) == split:
            out.append(p)
    return tuple(out)


def texts(split: str, max_chars: int | None = None, root: Path | None = None) -> Iterator[str]:
    """File contents of ``split`` in order (undecodable files skipped), up to ``max_chars`` in total."""
    total = 0
    for p in files(split, root):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if max_chars is not None and total + len(t) > max_chars:
            t = t[: max_chars - total]
        total += len(t)
        if t:
            yield t
        if max_chars is not None and total >= max_chars:
            return
