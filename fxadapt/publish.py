"""Publishing a compile's artifacts into OUT: all of them or none, never through a symlink, one compile at a time.

    with Publication(out_dir) as staging:     # OUT is locked; nothing exists on disk yet except the staging dir
        ... write model.onnx, report.json, ... into staging ...
        publication.commit()                  # files move into OUT, report.json last

- Staging lives inside OUT when OUT exists, else in OUT's nearest existing ancestor (an unwritable one is an
  error before the build starts); a move across filesystems (a mounted OUT) falls back to copying into a
  hidden file inside OUT and renaming it there, so each artifact still appears atomically.
- Nothing is created before `commit`: a failed build leaves no OUT, no parent directories, no staging.
- Targets are replaced without following symlinks (a link at OUT/model.onnx is replaced, its target kept).
- report.json moves last, so a report always describes the artifacts beside it.
- A lock keyed by OUT's absolute path serializes concurrent compiles to the same OUT.
- Staging directories of killed compiles (their pid no longer runs) are swept on the next compile.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from .errors import UserError
from .staging import make_staging, replace_path, sweep_stale

STAGING_PREFIX = ".fxadapt-stage-"
REPORT = "report.json"


class Publication:
    """Context manager yielding a staging directory; `commit()` moves its files into OUT (see module docstring)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))
        self.staging: Path | None = None
        self._lock: int | None = None

    def __enter__(self) -> Path:
        out = self.out_dir
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise UserError(f"output {out} exists and is not a directory; choose another -o path.")
        self._lock = _lock(out)
        try:
            home = _staging_home(out)
            sweep_stale(home, STAGING_PREFIX)
            self.staging = make_staging(home, STAGING_PREFIX)
        except OSError as exc:
            self._release()
            raise UserError(f"cannot write the output directory {out} ({exc.strerror or exc}); choose a writable "
                            "-o path.") from None
        except BaseException:
            self._release()
            raise
        return self.staging

    def commit(self) -> None:
        """Move every staged file into OUT (report.json last), replacing files of the same names only."""
        assert self.staging is not None, "commit() outside the with block"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            items = sorted(self.staging.iterdir(), key=lambda p: (p.name == REPORT, p.name))
            for item in items:
                replace_path(item, self.out_dir / item.name)
        except OSError as exc:
            raise UserError(f"cannot write the output directory {self.out_dir} ({exc.strerror or exc}); choose a "
                            "writable -o path.") from None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None


def _lock(out: Path) -> int:
    """An exclusive lock for OUT, in the temporary directory (so that nothing is created near OUT before the
    build succeeded); blocks while another compile to the same OUT runs."""
    locks = Path(tempfile.gettempdir()) / "fxadapt-locks"
    locks.mkdir(exist_ok=True)
    name = hashlib.sha256(str(out).encode()).hexdigest()[:32]
    handle = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _staging_home(out: Path) -> Path:
    """OUT when it exists, else its nearest existing ancestor (where OUT will be created): checked before the
    build, so that an unwritable -o fails at once instead of after minutes of exporting."""
    home = out if out.is_dir() else next(p for p in out.parents if p.exists() or p.is_symlink())
    if not home.is_dir():
        raise UserError(f"cannot create the output directory {out}: {home} is not a directory; choose a writable "
                        "-o path.")
    if not os.access(home, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output directory {out}: {home} is not writable; choose a writable "
                        "-o path.")
    return home
