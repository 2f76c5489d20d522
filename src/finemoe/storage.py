"""Atomic safetensors files: every file finemoe persists (map stores, activation collections, traces)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def save_atomic(write: Callable[[str], None], path: str) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`: readers and a crash
    see either the old file or the whole new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".finemoe-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; these are ordinary data files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
