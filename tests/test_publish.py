"""Publishing artifacts into OUT (fxadapt/publish.py): nothing created on failure, symlinks replaced not
followed, report.json last, other files kept, cross-filesystem moves, stale staging swept, one compile at a
time per OUT. Unit tests on plain files: no model is compiled here."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from fxadapt import publish
from fxadapt.errors import UserError
from fxadapt.publish import STAGING_PREFIX, Publication


def _build(staging: Path, text: str = "new") -> None:
    (staging / "model.onnx").write_text(text)
    (staging / "report.json").write_text(text)


def test_commit_moves_artifacts_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (out / "model.onnx").write_text("old")
    with (p := Publication(out)) as staging:
        assert staging.parent == out  # staged inside OUT: same filesystem, atomic renames
        _build(staging)
        p.commit()
    assert (out / "mine.txt").read_text() == "keep"
    assert (out / "model.onnx").read_text() == "new" and (out / "report.json").read_text() == "new"
    assert not [x for x in out.iterdir() if x.name.startswith(STAGING_PREFIX)]


def test_a_failed_build_creates_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), Publication(out) as staging:
        _build(staging)
        raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_untouched_by_a_failed_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(RuntimeError), Publication(out) as staging:
        _build(staging)
        raise RuntimeError("verification crashed")
    assert [x.name for x in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_text() == "old"


def test_symlinked_targets_are_replaced_not_followed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / "model.onnx").symlink_to(victim)
    with (p := Publication(out)) as staging:
        _build(staging)
        p.commit()
    assert victim.read_text() == "precious"
    assert not (out / "model.onnx").is_symlink() and (out / "model.onnx").read_text() == "new"


def test_out_as_a_symlink_or_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for bad in ("file", "link"):
        with pytest.raises(UserError, match="not a directory"), Publication(tmp_path / bad):
            pass


def test_report_moves_last(tmp_path, monkeypatch):
    order = []
    real = publish.replace_path
    monkeypatch.setattr(publish, "replace_path", lambda item, target: (order.append(item.name), real(item, target)))
    with (p := Publication(tmp_path / "out")) as staging:
        (staging / "z.bin").write_text("z")
        _build(staging)
        p.commit()
    assert order[-1] == "report.json" and set(order) == {"model.onnx", "z.bin", "report.json"}


def test_an_unwritable_or_non_directory_ancestor_fails_before_the_build(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"), Publication(tmp_path / "file" / "out"):
        pytest.fail("the build must not start")
    real = os.access
    monkeypatch.setattr(publish.os, "access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode))
    with pytest.raises(UserError, match="not writable"), Publication(tmp_path / "new" / "out"):
        pytest.fail("the build must not start")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cross_filesystem_moves_fall_back_to_copy_and_rename(tmp_path, monkeypatch):
    real = os.replace

    def replace(src, dst):
        if STAGING_PREFIX in str(src):  # only the move out of staging crosses "filesystems"
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(publish.os, "replace", replace)
    out = tmp_path / "out"
    with (p := Publication(out)) as staging:
        _build(staging)
        (staging / "sub").mkdir()
        (staging / "sub" / "x").write_text("x")
        p.commit()
    assert (out / "model.onnx").read_text() == "new" and (out / "sub" / "x").read_text() == "x"
    assert sorted(x.name for x in out.iterdir()) == ["model.onnx", "report.json", "sub"]


def test_stale_staging_of_a_killed_compile_is_swept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{STAGING_PREFIX}999999999-abc"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    with (p := Publication(out)) as staging:
        _build(staging)
        p.commit()
    assert not stale.exists()


def test_two_compiles_to_one_out_are_serialized(tmp_path):
    out = tmp_path / "out"
    events = []

    def compile_(tag: str) -> None:
        with (p := Publication(out)) as staging:
            events.append(f"start {tag}")
            time.sleep(0.3)
            _build(staging, tag)
            p.commit()
            events.append(f"end {tag}")

    threads = [threading.Thread(target=compile_, args=(t,)) for t in "ab"]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert events in (["start a", "end a", "start b", "end b"], ["start b", "end b", "start a", "end a"])
