"""tcptrace: which line of code opened the TCP sockets that never got closed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# --- lazy re-exports (issue 5): `import tcptrace` must stay light (no pandas/pyarrow),
# since the CLI and the tracer import it first; `tcptrace.load_report` pulls them in.
if TYPE_CHECKING:
    from tcptrace.report.loader import Report, load_report

__all__ = ["Report", "__version__", "load_report"]


def __getattr__(name: str) -> Any:
    if name in ("load_report", "Report"):
        from tcptrace.report import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'tcptrace' has no attribute {name!r}")
# --- end lazy re-exports
