"""Write a checkpoint's files INTO a directory the user owns, each file atomically, touching nothing else.

`save_adapter(DIR)` must not delete what else the user keeps in DIR (replacing the whole directory did),
and a failed save must leave DIR as it was. So the files are staged in a hidden directory inside DIR (same
filesystem: `os.replace` is atomic there, which a temporary directory beside DIR on another mount would not
be) and moved over their namesakes one by one, the config file last, so a reader that sees the new config
sees the new weights. Files of the layout that this save does not write (a head saved last time, a `.bin` of
an older format) are removed: left behind, they would be read together with the new files. Everything else
in DIR stays. New files and directories get the user's umask, like any file they create.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError
from ..staging import make_staging, replace_path, sweep_stale

STAGING_PREFIX = ".fxadapt-save-"


@contextlib.contextmanager
def write_into(directory: Path, path: str, known: Iterable[str], last: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success its files (relative paths, subdirectories included) replace
    their namesakes in `directory`, `last` moved after all others, and files listed in `known` that were not
    written are removed. On an error nothing in `directory` changes (a directory this call created is removed
    again). `path` names the call in error messages."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise UserError(f"{path}: {directory} exists and is not a directory; choose another path.")
    created = _missing_parents(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sweep_stale(directory, STAGING_PREFIX)
        stage = make_staging(directory, STAGING_PREFIX)
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"{path}: cannot write into {directory} ({exc.strerror or exc}); choose a writable "
                        "directory.") from None
    try:
        yield stage
        written = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        for relative in sorted(written, key=lambda r: r == last):
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            replace_path(stage / relative, target)
        for relative in set(known) - set(written):
            stale = directory / relative
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"{path}: cannot write {directory} ({exc.strerror or exc}); its previous files are "
                        "unchanged.") from None
    except BaseException:
        _remove_created(created)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _missing_parents(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for candidate in [directory, *directory.parents]:
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


def _remove_created(created: list[Path]) -> None:
    for candidate in created:  # innermost first; only what this call made, and only where nothing else appeared
        shutil.rmtree(candidate, ignore_errors=True) if candidate == created[0] else _rmdir_if_empty(candidate)


def _rmdir_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()
