from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tcptrace import fileio
from tcptrace.errors import ReportError, UsageError
from tcptrace.fileio import atomic_writer, prepare_output_dir, write_atomic

needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_writes_private_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    write_atomic(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_write_atomic_replaces_and_tightens_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


def test_failed_block_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


def test_enospc_becomes_report_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    target = tmp_path / "connections.parquet"
    with pytest.raises(ReportError) as info:
        write_atomic(target, b"x" * 1000)
    assert str(info.value).startswith("no space left on")
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_into_missing_directory_is_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="cannot write"):
        write_atomic(tmp_path / "nope" / "meta.json", b"{}")


def test_sudo_chown_hands_file_and_created_dirs_to_invoking_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chowned: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "5678")
    monkeypatch.setattr(os, "chown", lambda p, u, g: chowned.append((str(p), u, g)), raising=True)
    monkeypatch.setattr(os, "fchown", lambda fd, u, g: chowned.append(("fd", u, g)))

    out = prepare_output_dir(tmp_path / "a" / "b", force=False)
    assert chowned == [(str(tmp_path / "a"), 1234, 5678), (str(tmp_path / "a" / "b"), 1234, 5678)]
    write_atomic(out / "meta.json", b"{}")
    assert chowned[-1] == ("fd", 1234, 5678)


def test_no_chown_without_sudo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.delenv("SUDO_GID", raising=False)
    assert fileio.sudo_owner() is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "5678")
    assert fileio.sudo_owner() is None  # not root: nothing to hand over


def test_prepare_creates_missing_dir_with_parents(tmp_path: Path) -> None:
    target = tmp_path / "x" / "y" / "report"
    assert prepare_output_dir(target, force=False) == target
    assert target.is_dir()
    assert _mode(target) == 0o700


def test_prepare_accepts_existing_empty_dir(tmp_path: Path) -> None:
    assert prepare_output_dir(tmp_path, force=False) == tmp_path


def test_prepare_refuses_non_empty_dir_without_force(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("x")
    with pytest.raises(UsageError) as info:
        prepare_output_dir(tmp_path, force=False)
    assert "not empty" in str(info.value)
    assert "--force" in info.value.hint
    assert prepare_output_dir(tmp_path, force=True) == tmp_path
    assert (tmp_path / "old.csv").exists()  # force writes over; it does not wipe


def test_prepare_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        prepare_output_dir(target, force=True)


@needs_non_root
def test_prepare_non_writable_location_is_report_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ReportError, match="cannot create"):
            prepare_output_dir(locked / "report", force=False)
        with pytest.raises(ReportError, match="not writable"):
            prepare_output_dir(locked, force=False)
    finally:
        locked.chmod(0o700)


def test_prepare_permission_errors_are_report_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated, so it also runs as root (which ignores permission bits).
    def denied(
        self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False
    ) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ReportError) as info:
        prepare_output_dir(tmp_path / "report", force=False)
    assert (
        str(info.value)
        == f"cannot create report directory {tmp_path / 'report'}: Permission denied"
        " (choose another --output)"  # issue 7: every error names its fix
    )
    monkeypatch.undo()

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ReportError, match="not writable"):
        prepare_output_dir(tmp_path, force=False)
