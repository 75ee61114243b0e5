"""Shared test policy.

Kernel tests (marker `kernel`) run real BPF on the running kernel and need root.
Where they cannot run they skip, except when TCPTRACE_REQUIRE_KERNEL=1 (set by
.ci/run): then any skip of a kernel test is turned into a failure, so CI can
never pass by not tracing.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_KERNEL = os.environ.get("TCPTRACE_REQUIRE_KERNEL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_KERNEL and report.skipped and item.get_closest_marker("kernel") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"kernel test skipped but TCPTRACE_REQUIRE_KERNEL=1: {reason}"
