"""Tests that only mean something inside scripts/vm-test's VM (marker `vm`).

They need a kernel with kprobes, which our machines lack, so outside the VM they
are skipped and are not kernel tests (TCPTRACE_REQUIRE_KERNEL=1 on the host must
not turn their skip into a failure). scripts/vm-test sets TCPTRACE_IN_VM=1; there
they are kernel tests too, so a skip inside the VM fails the run.
"""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("TCPTRACE_IN_VM") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: runs only inside scripts/vm-test's VM (TCPTRACE_IN_VM=1)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.vm)
        if IN_VM:
            item.add_marker(pytest.mark.kernel)
        else:
            item.add_marker(pytest.mark.skip(reason="VM-only: run scripts/vm-test"))


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
