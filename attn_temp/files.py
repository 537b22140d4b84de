# Copyright 2025 The attn_temp developers. Licensed under the Apache License, Version 2.0.
"""Atomic file writes whose results get the permissions of a file created by `open()`.

Outputs are written to a temporary file in the target folder and renamed into place with `os.replace`, so a
crash never leaves a half-written file and never destroys the previous version. `tempfile` creates files
private (mode 0600), so each result is given the mode an ordinary new file would have (0666 minus the umask).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def ordinary_file_mode() -> int:
    """Return the permission bits `open()` gives a new file under the current umask."""
    # The umask can only be read by setting it, so it is set and put back at once.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`, on error delete it.

    The target is replaced only after the body finished without an exception, so its previous content
    survives any failure.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, ordinary_file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically, flushed to disk before the rename."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def restore_ordinary_modes(paths: Iterable[str | os.PathLike]) -> None:
    """Give files that a library created private the mode of an ordinary new file.

    NOTE: safetensors 0.8 writes each file as a private temporary file (mode 0600) and renames it, so
    `save_pretrained` leaves `*.safetensors` readable by its owner only, whatever the umask.
    """
    mode = ordinary_file_mode()
    for path in paths:
        os.chmod(path, mode)
