"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves nothing.

Write to a temporary name in the target's folder, then ``os.replace`` it into place (atomic on POSIX
within one file system). On any exception the temporary is removed and the previous file, if any,
is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; move it onto ``final`` when the block succeeds.

    Args:
        final: where the file (or folder, with ``is_dir=True``) must end up.
        is_dir: yield a fresh temporary folder instead of a file path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result the permissions a plain
    # open()/mkdir() would have under the current umask, since it becomes a normal user-facing file.
    umask = os.umask(0)
    os.umask(umask)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        tmp.chmod(0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)
