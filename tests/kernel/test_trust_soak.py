"""The soak script, one minute of it (issue 7): churn and leaks under tcptrace,
memory sampled, and at the end the ledger equal to `ss -tanp` for the targets.

The real figures come from long runs outside CI (`sudo scripts/soak --minutes 60`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("root")


def test_one_minute_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "soak"), "--minutes", "1", "--sample-every", "2",
         "--output", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "soak.json").read_text())
    assert summary["ok"] and summary["tcptrace_exit"] == 0
    assert summary["ledger_equals_ss"], (summary["only_in_ledger"], summary["only_in_ss"])
    # Leaks were really there to compare: the server's and the dialers' sockets.
    assert summary["open_in_ss"] >= 10
    # A minute of churn at 2000/s, every connection in the history (2 sockets each).
    assert summary["connections_in_report"] >= 2 * 2000 * 40
    assert summary["rss"]["flat"], summary["rss"]
    assert len(summary["samples"]) >= 20
    assert "verdict: PASS" in proc.stdout
