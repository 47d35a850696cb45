"""Hidden staging directories named by the writing process's pid, and the sweep of those a killed process left."""

from __future__ import annotations

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
