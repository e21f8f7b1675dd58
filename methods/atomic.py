"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; give it the mode any new file gets (a shared
        # results folder on a cluster is the normal case)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    _atomic(Path(path), write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_save_npy(array: Any, path: str | os.PathLike) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    _atomic(Path(path), write)
