"""Fixtures for kernel tests: root and a working bcc, or skip (a failure in CI)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
