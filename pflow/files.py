"""Writing result files so that none is ever half written or unreadable by its owner's
group: a temporary file beside the target, renamed onto it, with the mode a plain
``open()`` would give (``0666 & ~umask``; ``tempfile`` and safetensors make ``0600``).
A leaf module: the benchmark and the command line both write through it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["file_mode", "probe_writable", "write_atomic"]


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: ``0666 & ~umask``."""
    return 0o666 & ~_umask()


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file next to ``path`` (same suffix, so writers that
    pick a format by suffix keep it), give it :func:`file_mode`, then rename it onto
    ``path``: an interrupted or failed write leaves no half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: tried, not guessed from permission bits (a
    read-only mount, ``/sys`` and root squash fail here). Raises ``OSError``."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".pflow-write-test-")
    os.close(fd)
    os.unlink(probe)
