"""Hidden staging directories named by the writing process's pid, the sweep of those a killed process left, and
moving a staged file into place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


def make_staging(home: Path, prefix: str) -> Path:
    """A new empty directory `home/<prefix><pid>-XXXX` (mode 0700, removed by the caller when done)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=home))


def sweep_stale(home: Path, prefix: str) -> None:
    """Remove staging directories in `home` whose process no longer runs (a save or compile that was killed)."""
    for stale in home.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def replace_path(item: Path, target: Path) -> None:
    """Put `item` at `target` atomically, replacing a file, directory or symlink there. rename(2) replaces a
    symlink itself, never what it points to; a real directory is removed first. Across filesystems (a mounted
    target) `item` is copied beside the target and renamed there, so the target still appears at once."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    try:
        os.replace(item, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.fxadapt-partial-{os.getpid()}")
        try:
            if item.is_dir():
                shutil.copytree(item, partial, symlinks=True)
            else:
                shutil.copy2(item, partial)
            os.replace(partial, target)
        except BaseException:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    partial.unlink()
            raise
