"""The one exception type for user errors.

The CLI turns a :class:`BrainITError` into one line on stderr and a non-zero exit, never a traceback.
Library code raises it (or a subclass) whenever the cause is the user's input: a missing file, a wrong
shape, a bad field. The message says what was expected, what was found, and how to fix it.
"""

from __future__ import annotations

import errno
import os
import re


class BrainITError(Exception):
    """A user error: bad input, a missing file, an incompatible store. Printed as one line."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`BrainITError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise BrainITError(message)


# --------------------------------------------------------------------------------------------- I/O failures
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # EFBIG: a file size limit (ulimit -f)
NOT_ALLOWED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# HDF5 reports the failed system call inside its message: "filename = 'F', ..., errno = 28, ..."
_H5_FILENAME = re.compile(r"filename = '([^']*)'")
_H5_ERRNO = re.compile(r"errno = (\d+)")
_TEMPORARY = re.compile(r"(^|/)\.([^/]+)\.[\w-]{8}\.tmp(?=/|$)")  # brainit_pl.files.atomic_path's names


def io_error_message(err: OSError) -> str | None:
    """One line for an :class:`OSError` the user fixes outside brainit-pl (a full disk, a folder that cannot be
    written), naming the file; ``None`` for any other error (a bug: it keeps its traceback)."""
    text = str(err)
    code = int(found.group(1)) if (found := _H5_ERRNO.search(text)) else err.errno
    name = err.filename or (found.group(1) if (found := _H5_FILENAME.search(text)) else None)
    where = " " + _TEMPORARY.sub(r"\1\2", os.fspath(name)) if name else ""  # the file it was to become
    if code in DISK_FULL:
        return (
            f"disk full (or file size limit reached){' while writing' + where if name else ''}: free space and "
            "re-run the same command; what was finished is kept, nothing half-written is"
        )
    if code in NOT_ALLOWED:
        return f"cannot write{where}: {os.strerror(code)}; choose another --out, or make that folder writable"
    return None


def hdf5_write_failed(err: BaseException) -> bool:
    """True for HDF5's failed write: after it the library's state is broken and releasing the file's handles
    crashes the process (h5py 3.16 / HDF5 2.0), so the CLI must exit without releasing them."""
    return isinstance(err, OSError) and "file write failed" in str(err)
