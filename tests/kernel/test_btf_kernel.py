"""tcptrace.btf against the running kernel, checked with bpftool's own BTF dump.

The expected offsets are resolved here from `bpftool btf dump ... format raw` text
with code that shares nothing with tcptrace/btf.py, so a bug in the reader shows up
as a disagreement rather than being repeated on both sides.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tcptrace.btf import KernelBtf, MemberOffset, kernel_offsets
from tcptrace.errors import BtfError

pytestmark = pytest.mark.kernel

VMLINUX = Path("/sys/kernel/btf/vmlinux")

# Restated from the brief, not imported from btf.py: macro -> (struct, member path).
EXPECTED_OFFSETS: dict[str, tuple[str, str]] = {
    "TT_OFF_TASK_FILES": ("task_struct", "files"),
    "TT_OFF_TASK_TGID": ("task_struct", "tgid"),
    "TT_OFF_FILES_FDT": ("files_struct", "fdt"),
    "TT_OFF_FDT_FD": ("fdtable", "fd"),
    "TT_OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "TT_OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "TT_OFF_SOCKET_SK": ("socket", "sk"),
    "TT_OFF_SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "TT_OFF_SK_STATE": ("sock", "__sk_common.skc_state"),
    "TT_OFF_SK_NUM": ("sock", "__sk_common.skc_num"),
    "TT_OFF_SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "TT_OFF_SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "TT_OFF_SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "TT_OFF_SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "TT_OFF_SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "TT_OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
    "TT_OFF_SK_TYPE": ("sock", "sk_type"),
    "TT_OFF_TCP_BYTES_ACKED": ("tcp_sock", "bytes_acked"),
    "TT_OFF_TCP_BYTES_RECEIVED": ("tcp_sock", "bytes_received"),
}
# Saved syscall registers (connect()/listen() fds), used on x86-64 only.
if platform.machine() == "x86_64":
    EXPECTED_OFFSETS["TT_OFF_REGS_SYSCALL_NR"] = ("pt_regs", "orig_ax")
    EXPECTED_OFFSETS["TT_OFF_REGS_ARG1"] = ("pt_regs", "di")
EXPECTED_SIZES: dict[str, tuple[str, str]] = {
    "TT_SIZE_SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "TT_SIZE_SK_STATE": ("sock", "__sk_common.skc_state"),
    "TT_SIZE_SK_PROTOCOL": ("sock", "sk_protocol"),
    "TT_SIZE_SK_TYPE": ("sock", "sk_type"),
}
# Measured by hand on 6.18 (shared/notes/kernel.md).
KNOWN_6_18 = {
    "TT_OFF_TASK_FILES": 1824,
    "TT_OFF_FILES_FDT": 32,
    "TT_OFF_FDT_FD": 8,
    "TT_OFF_FILE_PRIVATE_DATA": 24,
    "TT_OFF_SOCKET_SK": 24,
}

_TYPE_LINE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER_LINE = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")
_ATTR = re.compile(r"(\w+)=([^\s,]+)")


@dataclass
class RawType:
    kind: str
    name: str
    attrs: dict[str, str]
    members: list[tuple[str, int, int, int]] = field(default_factory=list)


class BpftoolBtf:
    """Types as bpftool prints them, and a deliberately plain resolver."""

    def __init__(self, text: str) -> None:
        self.types: dict[int, RawType] = {}
        self.by_name: dict[str, list[int]] = {}
        current: RawType | None = None
        for line in text.splitlines():
            m = _TYPE_LINE.match(line)
            if m:
                tid = int(m.group(1))
                current = RawType(m.group(2), m.group(3), dict(_ATTR.findall(m.group(4))))
                self.types[tid] = current
                if current.kind == "STRUCT":
                    self.by_name.setdefault(current.name, []).append(tid)
                continue
            mm = _MEMBER_LINE.match(line)
            if mm and current is not None and current.kind in ("STRUCT", "UNION"):
                current.members.append(
                    (mm.group(1), int(mm.group(2)), int(mm.group(3)), int(mm.group(4) or 0))
                )

    def strip(self, tid: int) -> int:
        while self.types[tid].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            tid = int(self.types[tid].attrs["type_id"])
        return tid

    def size(self, tid: int) -> int:
        t = self.types[self.strip(tid)]
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return int(t.attrs["nr_elems"]) * self.size(int(t.attrs["type_id"]))
        return int(t.attrs["size"])

    def lookup(self, tid: int, name: str) -> tuple[int, int, int] | None:
        """(bits_offset, type_id, bitfield_size), searching anonymous members depth first."""
        for mname, mtype, bits, bf in self.types[tid].members:
            if mname == name:
                return bits, mtype, bf
            if mname == "(anon)":
                inner = self.strip(mtype)
                if self.types[inner].kind in ("STRUCT", "UNION"):
                    hit = self.lookup(inner, name)
                    if hit is not None:
                        return bits + hit[0], hit[1], hit[2]
        return None

    def member(self, struct: str, path: str) -> tuple[int, int]:
        ids = self.by_name[struct]
        assert len(ids) == 1, f"struct {struct} is defined {len(ids)} times"
        tid, bits = ids[0], 0
        mtype = tid
        for part in path.split("."):
            hit = self.lookup(self.strip(mtype), part)
            assert hit is not None, f"bpftool shows no {struct}.{path}"
            assert hit[2] == 0, f"{struct}.{path} is a bitfield"
            bits += hit[0]
            mtype = hit[1]
        assert bits % 8 == 0
        return bits // 8, self.size(mtype)


def _bpftool() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("bpftool", path=path)


@pytest.fixture(scope="module")
def reference() -> BpftoolBtf:
    bpftool = _bpftool()
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} absent: kernel without CONFIG_DEBUG_INFO_BTF")
    if bpftool is None:
        pytest.skip("bpftool not installed")
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return BpftoolBtf(out)


@pytest.fixture(scope="module")
def btf(reference: BpftoolBtf) -> KernelBtf:
    return KernelBtf.load(VMLINUX)


def test_type_count_matches_bpftool(btf: KernelBtf, reference: BpftoolBtf) -> None:
    # Every type id lines up only if every kind was skipped by its right length.
    assert btf.type_count == max(reference.types)


def test_every_offset_matches_bpftool(btf: KernelBtf, reference: BpftoolBtf) -> None:
    offs = kernel_offsets(btf).as_dict()
    assert set(offs) == set(EXPECTED_OFFSETS) | set(EXPECTED_SIZES)
    for macro, (struct, path) in EXPECTED_OFFSETS.items():
        want_off, want_size = reference.member(struct, path)
        assert offs[macro] == want_off, macro
        assert btf.member(struct, path) == MemberOffset(struct, path, want_off, want_size)
    for macro, (struct, path) in EXPECTED_SIZES.items():
        assert offs[macro] == reference.member(struct, path)[1], macro


def test_sock_common_members_directly(btf: KernelBtf, reference: BpftoolBtf) -> None:
    # The same fields looked up in sock_common itself (through its anonymous unions).
    for member in (
        "skc_daddr",
        "skc_rcv_saddr",
        "skc_dport",
        "skc_num",
        "skc_family",
        "skc_state",
        "skc_v6_daddr",
        "skc_cookie",
        "skc_refcnt",
    ):
        off, size = reference.member("sock_common", member)
        assert btf.member("sock_common", member) == MemberOffset(
            "sock_common", member, off, size
        ), member


def test_real_bitfield_is_refused(btf: KernelBtf, reference: BpftoolBtf) -> None:
    # skc_reuse is `unsigned char skc_reuse:4`, encoded with kind_flag in vmlinux.
    sc = reference.types[reference.by_name["sock_common"][0]]
    assert any(m[0] == "skc_reuse" and m[3] == 4 for m in sc.members)
    with pytest.raises(BtfError, match=r"sock\.__sk_common\.skc_reuse is a bitfield"):
        btf.member("sock", "__sk_common.skc_reuse")


def test_known_values_on_6_18(btf: KernelBtf) -> None:
    if not platform.release().startswith("6.18"):
        pytest.skip(f"known values are for 6.18, this is {platform.release()}")
    offs = kernel_offsets(btf).as_dict()
    assert {k: offs[k] for k in KNOWN_6_18} == KNOWN_6_18


def test_default_path_resolves_every_offset(reference: BpftoolBtf) -> None:
    # The load time (~40 ms here) is a start-up cost, shown by
    # benchmarks/churn's attach-time figure, not asserted by a timed test.
    offs = kernel_offsets()
    assert offs.as_dict() == kernel_offsets(KernelBtf.load(VMLINUX)).as_dict()
    assert offs.TT_OFF_TASK_FILES > 0
