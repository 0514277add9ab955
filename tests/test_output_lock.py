"""A store never half-exists (issue #19, item 3): one writer per output, and a replaced store stays whole
until its successor is complete."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from brainit_pl.cli import main
from brainit_pl.files import lock_path, output_lock
from test_fit import DIST_VARS

SRC = Path(__file__).parents[1] / "src"


def _python(code: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs)


def _cli(*argv: str) -> subprocess.Popen:
    code = f"import sys; from brainit_pl.cli import main; sys.exit(main({list(argv)!r}))"
    return _python(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_holder(path: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    lock = lock_path(path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == str(pid):
            return
        assert proc.poll() is None, "the first writer ended before it was seen holding the lock"
        time.sleep(0.01)
    raise AssertionError("the first writer never took the lock")


def _one_error(stderr_lines) -> str:
    lines = stderr_lines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


def _subjects(store: Path) -> list:
    return sorted(json.loads((store / "manifest.json").read_text())["subjects"])


def test_two_extract_features_on_one_store(tiny_store, tmp_path, stderr_lines):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    first = _cli("extract-features", "--store", str(store), "--tiny", "--batch-size", "1")
    _wait_for_holder(store, first.pid, first)
    stderr_lines()
    assert main(["extract-features", "--store", str(store), "--tiny"]) == 2  # while the first one runs
    assert f"in use by pid {first.pid}" in _one_error(stderr_lines)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert (store / "features_clip.h5").is_file()
    assert main(["extract-features", "--store", str(store), "--tiny"]) == 0  # free again


def test_overwrite_is_refused_while_another_writer_holds_the_store(
    tiny_nsd, tiny_store, tmp_path, stderr_lines
):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    holder = _python(
        f"""
        import time
        from brainit_pl.files import output_lock
        with output_lock({str(store)!r}):
            time.sleep(60)
        """
    )
    try:
        _wait_for_holder(store, holder.pid, holder)
        stderr_lines()
        argv = ["prepare", "--nsd-root", str(tiny_nsd), "--out", str(store), "--overwrite"]
        assert main(argv) == 2
        assert f"in use by pid {holder.pid}" in _one_error(stderr_lines)
        assert _subjects(store) == _subjects(tiny_store)  # untouched
        for job in (["cluster", "--store", str(tiny_store), "--kind", "anatomical", "--out", str(store)],):
            assert main(job) == 2 and "in use by pid" in _one_error(stderr_lines)
    finally:
        holder.kill()
        holder.wait()
    assert main(["cluster", "--store", str(tiny_store), "--kind", "anatomical", "--out", str(tmp_path / "v2c"),
                 "--clusters", "2", "--no-plots"]) == 0  # fmt: skip


def test_a_crash_between_delete_and_rename_keeps_the_old_store(tiny_nsd, tmp_path, stderr_lines):
    out = tmp_path / "store"
    assert main(["prepare", "--nsd-root", str(tiny_nsd), "--out", str(out), "--subjects", "1"]) == 0
    old = (out / "manifest.json").read_text()
    # prepare --overwrite in a process that dies (no handler runs) the moment the new store would be renamed
    # onto --out: whatever was done to the old store before that point is all that happened
    crash = _python(
        f"""
        import os, sys
        from brainit_pl.cli import main
        real = os.replace
        def replace(src, dst):
            if os.path.realpath(dst) == {str(out.resolve())!r} and ".tmp" in os.path.basename(src):
                os._exit(9)
            return real(src, dst)
        os.replace = replace
        sys.exit(main(["prepare", "--nsd-root", {str(tiny_nsd)!r}, "--out", {str(out)!r}, "--overwrite"]))
        """,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    crash.communicate(timeout=600)
    assert crash.returncode == 9, "the overwrite never reached its final rename"
    # the old store is whole, in place or set aside, and the next writer of the store puts it back
    kept = [p for p in [out, *tmp_path.glob(".store.*")] if (p / "manifest.json").is_file()]
    assert any((p / "manifest.json").read_text() == old for p in kept), kept
    stderr_lines()
    assert main(["prepare", "--nsd-root", str(tiny_nsd), "--out", str(out)]) == 2  # exists: no --overwrite
    assert "already exists" in _one_error(stderr_lines)
    assert (out / "manifest.json").read_text() == old
    assert not [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".store.") and p.name != ".store.lock"
    ]
    # and a complete overwrite still works
    assert main(["prepare", "--nsd-root", str(tiny_nsd), "--out", str(out), "--overwrite"]) == 0
    assert len(_subjects(out)) == 2 and (out / "manifest.json").read_text() != old


def test_lock_is_reentrant_and_released(tmp_path):
    target = tmp_path / "out"
    with output_lock(target):
        with output_lock(target):  # a job that calls another job on the same output
            assert lock_path(target).read_text().strip() == str(os.getpid())
    assert not lock_path(target).exists()  # deleted on release
    probe = _python(f"from brainit_pl.files import output_lock\nwith output_lock({str(target)!r}): pass")
    assert probe.wait(timeout=120) == 0  # another process can take it now


def test_stale_temporaries_of_a_killed_writer_are_cleaned(tmp_path):
    name = "store"
    target = tmp_path / name
    (tmp_path / f".{name}.abcd1234.tmp").mkdir()  # a killed prepare's half-built store
    (tmp_path / f".{name}.efgh5678.tmp").write_text("half")
    (tmp_path / f".{name}.x.other").write_text("not ours")
    with output_lock(target):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.x.other"]
