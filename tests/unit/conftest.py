"""Fixtures shared by the unit tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR (where crash reports go) set to tmp_path, TCPTRACE_DEBUG unset."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("TCPTRACE_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path
