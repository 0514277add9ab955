"""Atomic file writes, and the one door through which a user's checkpoint file is read.

Atomic writes: a reader never sees a half-written file, and a failed write leaves nothing.

Write to a temporary name in the target's folder, then ``os.replace`` it into place (atomic on POSIX
within one file system). On any exception the temporary is removed and the previous file, if any,
is untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainit_pl.errors import BrainITError


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
            swap_dir(tmp, final)
        else:
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


# ------------------------------------------------------------------------------------------- replacing folders
def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.{os.getpid()}.aside"


def _asides(final: Path) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.\d+\.aside$")
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if pattern.match(p.name))


def swap_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder ``new`` in the place of the folder ``final``; the old one stays whole meanwhile.

    ``final`` is renamed aside (``.NAME.PID.aside``), ``new`` renamed into place, then the old folder deleted.
    A crash between the two renames leaves the old folder whole under its aside name; the next writer of
    ``final`` (:func:`output_lock`) renames it back.
    """
    new, final = Path(new), Path(final)
    aside = _aside(final)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)  # the old one back: nothing changed
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover(final: str | os.PathLike) -> None:
    """Undo what a killed writer of ``final`` left: an old folder set aside by :func:`swap_dir` goes back
    (when ``final`` is missing) or is deleted (when the new one made it), and the temporaries of
    :func:`atomic_path` for ``final`` are deleted. Call it holding ``final``'s :func:`output_lock`."""
    final = Path(final)
    for aside in _asides(final):
        if not final.exists():
            os.replace(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    temporary = re.compile(rf"^\.{re.escape(final.name)}\.[\w-]{{8}}\.tmp$")  # mkstemp / mkdtemp names
    if final.parent.is_dir():
        for tmp in final.parent.iterdir():
            if temporary.match(tmp.name):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- output locks
def lock_path(final: str | os.PathLike) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it (outside it: it outlives swaps of the output),
    there while a writer holds it."""
    final = Path(os.path.realpath(final))
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``final`` (a store, a folder of results) while the block runs.

    Every brainit-pl writer takes it (prepare, extract-features, synthesize-fmri, reconstruct, cluster): a
    second writer of the same output is refused in one line naming the holder's pid. The lock is an
    ``fcntl.flock`` on :func:`lock_path` (holding the pid; deleted on release), so the kernel releases it when
    its process dies: a killed run never blocks the next one, which then cleans what it left
    (:func:`recover`). Re-entrant in a process.
    """
    import fcntl

    final = Path(final)
    path = lock_path(final)
    if path in _HELD:
        yield final
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # the holder deletes the file on release: lock the file that is at `path` now
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BrainITError(
                f"{final} is in use by pid {holder} (another brainit-pl command writes it); wait for it to "
                "finish or stop it"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # released and deleted meanwhile: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(path)
        try:
            recover(final)
            yield final
        finally:
            _HELD.discard(path)
            path.unlink(missing_ok=True)  # still holding it: nobody else can be using this file
    finally:
        os.close(fd)  # releases the flock


_HELD: set[Path] = set()  # the lock files this process holds (a job that calls another job re-enters)


# ------------------------------------------------------------------------------------------- checkpoints
# A torch checkpoint is a pickle: read without restriction, a crafted file runs code. Every checkpoint a user
# can pass is read here with ``weights_only=True`` (tensors, containers, numbers, strings) plus the few plain
# types below; anything else is refused with one line unless the command was given --trust-checkpoint.
_TRUSTED = (
    False  # set by --trust-checkpoint (a process-wide switch: DataLoader workers never read checkpoints)
)
_UNSAFE = re.compile(r"GLOBAL ([\w.]+)")


def safe_checkpoint_types() -> list[Any]:
    """The non-tensor types a brainit-pl / Lightning checkpoint may hold besides torch's defaults.

    Our ``fit`` checkpoints hold none (Lightning saves ``hyper_parameters`` as a plain dict;
    tests/test_checkpoint_safety.py reads real ones); these are the harmless value types that hyperparameters
    set from Python may add: paths, an ``argparse.Namespace``, numpy scalars and dtypes. (A dict subclass such
    as Lightning's ``AttributeDict`` cannot be allowed: torch's restricted unpickler fills only plain dicts.)
    """
    import argparse
    import pathlib

    import numpy as np

    try:  # how numpy >= 2 pickles a scalar
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import scalar

    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
        argparse.Namespace,
        scalar,
        np.dtype,
        *dtypes,
    ]


@contextlib.contextmanager
def trusting_checkpoints(trust: bool = True) -> Iterator[None]:
    """While the block runs, checkpoints are read with full unpickling if ``trust`` (``--trust-checkpoint``)."""
    global _TRUSTED
    saved, _TRUSTED = _TRUSTED, bool(trust)
    try:
        yield
    finally:
        _TRUSTED = saved


def checkpoints_trusted() -> bool:
    """True inside ``trusting_checkpoints(True)``: loads run with ``weights_only=False``."""
    return _TRUSTED


@contextlib.contextmanager
def checkpoint_guard(path: str | os.PathLike | None) -> Iterator[bool]:
    """Around any ``torch.load`` of a user's checkpoint: the allow-list is active, and a file that needs
    arbitrary unpickling becomes one line naming it. Yields the ``weights_only`` value to load with."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(safe_checkpoint_types()):
            yield not _TRUSTED
    except pickle.UnpicklingError as err:
        message = str(err).lower()
        if "weights_only" not in message and "weights only" not in message:
            raise
        found = _UNSAFE.search(str(err))
        if found is None and "unsupported global" not in message:
            raise  # not a forbidden type but an unreadable file: the caller says what it expected
        what = f" ({found.group(1)})" if found else ""
        raise BrainITError(
            f"{path} refused: reading it needs arbitrary unpickling{what}, which can run code; "
            "pass --trust-checkpoint only if you trust where the file comes from"
        ) from None


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load`` of a user's checkpoint on the CPU, through :func:`checkpoint_guard`."""
    import torch

    with checkpoint_guard(path) as weights_only:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)


def load_module(cls: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` on the CPU (a LightningModule), through :func:`checkpoint_guard`."""
    with checkpoint_guard(path) as weights_only:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only, **kwargs)
