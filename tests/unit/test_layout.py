"""Pins the Python mirror of `struct tt_record` (and the enums) to bpf/tcptrace.h.

The header is compiled by the host C compiler and every offset, size and enum
value is compared with tcptrace/events.py. No root needed.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tcptrace import events

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "tcptrace.h"


def _c_fields() -> list[str]:
    body = HEADER.read_text().split("struct tt_record {", 1)[1].split("};", 1)[0]
    names = []
    for line in body.splitlines():
        line = line.split("/*")[0].strip()
        m = re.match(r"^[\w ]+?\s+(\w+)(\[[^\]]+\])?;$", line)
        if m:
            names.append(m.group(1))
    return names


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    names = _c_fields()
    tmp = tmp_path_factory.mktemp("layout")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        f'#include "{HEADER}"',
        "int main(void) {",
        'printf("{\\"size\\": %zu, \\"fields\\": {", sizeof(struct tt_record));',
    ]
    for i, name in enumerate(names):
        sep = "," if i else ""
        lines.append(
            f'printf("{sep}\\"{name}\\": [%zu, %zu]", offsetof(struct tt_record, {name}), '
            f"sizeof(((struct tt_record *)0)->{name}));"
        )
    lines.append('printf("}, \\"enums\\": {");')
    enum_names = re.findall(r"^\s*(TT_(?:KIND|DIR|FLAG|STAT)_\w+)\s*=", HEADER.read_text(), re.M)
    for i, name in enumerate(enum_names):
        sep = "," if i else ""
        lines.append(f'printf("{sep}\\"{name}\\": %d", (int){name});')
    lines.append('printf("}, \\"version\\": %d}", TT_LAYOUT_VERSION); return 0; }')
    src = tmp / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def test_record_size_and_every_offset_match(c_layout: dict[str, object]) -> None:
    fields = c_layout["fields"]
    assert isinstance(fields, dict)
    py = events.RawSocketRecord
    assert [f[0] for f in py._fields_] == list(fields), "field order differs"
    for name, (offset, size) in fields.items():
        desc = getattr(py, name)
        assert (desc.offset, desc.size) == (offset, size), name
    assert ctypes.sizeof(py) == c_layout["size"] == events.RECORD_SIZE


def test_enums_match(c_layout: dict[str, object]) -> None:
    enums = c_layout["enums"]
    assert isinstance(enums, dict)
    for name, value in enums.items():
        group, _, member = name[3:].partition("_")
        if member == "_COUNT":
            assert value == events.KERNEL_STAT_COUNT
            continue
        py_enum = {
            "KIND": events.RecordKind,
            "FLAG": events.RecordFlag,
            "STAT": events.KernelStat,
        }.get(group)
        if group == "DIR":
            assert events.Direction.from_kernel(value).name == member
        else:
            assert py_enum is not None
            assert py_enum[member].value == value, name
    assert c_layout["version"] == events.LAYOUT_VERSION


def test_decode_round_trip() -> None:
    raw = events.RawSocketRecord()
    raw.kind = events.RecordKind.BIRTH
    raw.family = 2
    raw.laddr[:4] = [127, 0, 0, 1]
    raw.raddr[:4] = [10, 1, 2, 3]
    raw.lport, raw.rport = 8080, 443
    raw.state = events.TcpState.CLOSE_WAIT
    raw.direction = 2
    raw.comm = b"server"
    raw.fd = 7
    rec = events.SocketRecord.decode(bytes(raw))
    assert (rec.laddr, rec.raddr, rec.lport, rec.rport) == ("127.0.0.1", "10.1.2.3", 8080, 443)
    assert rec.state is events.TcpState.CLOSE_WAIT
    assert rec.direction is events.Direction.ACCEPT
    assert (rec.comm, rec.fd) == ("server", 7)
    with pytest.raises(ValueError):
        events.SocketRecord.decode(bytes(raw)[:10])
