"""The loop boundary's pieces without root (issue 7): its exit code and its test hook.

The behaviour itself (report written, traceback saved, probes gone) is checked
through the real CLI in tests/kernel/test_trust_internal_error.py.
"""

from __future__ import annotations

import pytest

from tcptrace import errors
from tcptrace.tracer import FAULT_ENV, _injected_fault


def test_internal_error_during_a_trace_has_its_own_documented_code() -> None:
    documented = dict(errors.EXIT_CODES)
    code = errors.TraceInternalError.exit_code
    assert code == 12 and code != errors.INTERNAL_ERROR_EXIT
    assert "report and traceback written" in documented[code]
    assert not issubclass(errors.TraceInternalError, errors.ReportError)


def test_fault_injection_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert _injected_fault() is None
    monkeypatch.setenv(FAULT_ENV, "loop:7")
    assert _injected_fault() == 7


@pytest.mark.parametrize("value", ["loop", "loop:0", "loop:-1", "loop:x", "history:3"])
def test_a_malformed_fault_request_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(FAULT_ENV, value)
    with pytest.raises(errors.UsageError, match="is not loop:N"):
        _injected_fault()
