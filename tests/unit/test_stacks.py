"""Symbolization helpers that need no root: /proc maps parsing, ELF address math, addr2line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tcptrace.sockets import StackStatus
from tcptrace.stacks import LineResolver, Mapping, StackSymbolizer, parse_maps
from tcptrace.tracer import MAX_UNREADABLE_NAMED, _unreadable_warner

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 123 /usr/bin/prog
55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 123 /usr/bin/prog
7f00aa000000-7f00aa100000 r-xp 00028000 fd:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffc11000000-7ffc11021000 rw-p 00000000 00:00 0 [stack]
7ffc11100000-7ffc11102000 r-xp 00000000 00:00 0 [vdso]
"""


def test_parse_maps_keeps_executable_file_mappings() -> None:
    maps = parse_maps(MAPS)
    assert [m.path for m in maps] == ["/usr/bin/prog", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    assert maps[0] == Mapping(0x55D0C0A01000, 0x55D0C0A05000, 0x1000, "/usr/bin/prog")


@pytest.fixture(scope="module")
def pie_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("addr2line") is None:
        pytest.skip("needs a C compiler and binutils")
    tmp = tmp_path_factory.mktemp("pie")
    src = tmp / "prog.c"
    src.write_text(
        "int leaky_site(int x) {\n  return x * 3;\n}\nint main(void) { return leaky_site(2); }\n"
    )
    exe = tmp / "prog"
    subprocess.run([cc, "-g", "-O0", "-fPIE", "-pie", "-o", str(exe), str(src)], check=True)
    return exe


def _symbol_vaddr(exe: Path, name: str) -> int:
    out = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts[-1] == name:
            return int(parts[0], 16)
    raise AssertionError(name)


def test_runtime_address_of_a_pie_maps_back_to_file_and_line(pie_binary: Path) -> None:
    vaddr = _symbol_vaddr(pie_binary, "leaky_site")
    base = 0x5555_5555_0000
    # As the loader maps it: the text page at its file offset, shifted by base.
    page = vaddr & ~0xFFF
    maps = [Mapping(base + page, base + page + 0x1000, page, str(pie_binary))]
    resolver = LineResolver()
    where = resolver.file_address(base + vaddr + 4, maps)
    assert where == (str(pie_binary), vaddr + 4)
    lines = resolver.lines(str(pie_binary), [vaddr + 4])
    assert lines[vaddr + 4].endswith("prog.c:1") or lines[vaddr + 4].endswith("prog.c:2")


def test_symbolizer_orders_frames_outermost_first_and_caches() -> None:
    calls: list[int] = []

    def addresses(stack_id: int) -> list[int]:
        calls.append(stack_id)
        return [0x30, 0x20, 0x10]  # innermost first, as bcc walks them

    names = {0x30: "connect", 0x20: "dial_one", 0x10: "main"}
    sym = StackSymbolizer(addresses, lambda a, _p: (names[a], ""), with_lines=False)
    frames, status = sym.resolve(42, 7)
    assert status is StackStatus.OK
    assert frames == ("main", "dial_one", "connect")
    assert sym.resolve(42, 7) == (frames, status)
    assert calls == [7]


def test_symbolizer_reports_failures_instead_of_guessing() -> None:
    sym = StackSymbolizer(lambda _s: [], lambda a, _p: ("x", ""), with_lines=False)
    assert sym.resolve(1, -14) == ((), StackStatus.FAILED)
    assert sym.resolve(1, 3) == ((), StackStatus.FAILED)  # id evicted from the stack map
    unknown = StackSymbolizer(
        lambda _s: [0x10], lambda a, _p: ("[unknown]", ""), with_lines=False,
        denied=lambda _pid: False,
    )  # fmt: skip
    frames, status = unknown.resolve(1, 1)
    assert status is StackStatus.UNSYMBOLIZED and frames == ("0x10",)
    assert unknown.counters["stacks_unsymbolized"] == 1
    assert unknown.counters["stacks_unreadable_process"] == 0


def test_a_process_tcptrace_may_not_read_is_its_own_loss_named_once() -> None:
    told: list[int] = []
    sym = StackSymbolizer(
        lambda s: [0x10 + s], lambda a, _p: ("[unknown]", ""), with_lines=False,
        denied=lambda pid: pid == 7, on_unreadable=told.append,
    )  # fmt: skip
    assert sym.resolve(7, 1) == (("0x11",), StackStatus.UNSYMBOLIZED)
    assert sym.resolve(7, 2) == (("0x12",), StackStatus.UNSYMBOLIZED)
    assert sym.resolve(8, 1) == (("0x11",), StackStatus.UNSYMBOLIZED)  # readable, no names
    assert sym.counters == {"stacks_unreadable_process": 2, "stacks_unsymbolized": 1}
    assert told == [7]  # once per process
    sym.forget_process(7)  # exited: a new process under that pid is told again
    sym.resolve(7, 1)
    assert told == [7, 7]


def test_kernel_frames_follow_the_user_frames_innermost_last() -> None:
    stacks_by_id = {1: [0x30, 0x10], 9: [0xB, 0xA]}  # innermost first
    names = {0x30: "connect", 0x10: "main"}
    ksyms = {0xB: "tcp_v4_connect", 0xA: "__sys_connect"}
    sym = StackSymbolizer(
        lambda s: stacks_by_id[s],
        lambda a, _p: (names[a], ""),
        with_lines=False,
        kernel_symbol=lambda a: ksyms[a],
    )
    frames, status = sym.resolve(5, 1, 9)
    assert frames == ("main", "connect", "[k] __sys_connect", "[k] tcp_v4_connect")
    assert status is StackStatus.OK
    assert sym.resolve(5, 1) == (("main", "connect"), StackStatus.OK)


def test_unreadable_processes_are_named_up_to_a_few() -> None:
    lines: list[str] = []
    tell = _unreadable_warner(lines.append)
    for pid in range(1_000_000, 1_000_000 + MAX_UNREADABLE_NAMED + 3):  # pids that are gone
        tell(pid)
    assert len(lines) == MAX_UNREADABLE_NAMED + 1  # then one line, then silence
    assert lines[0].startswith("tcptrace: cannot symbolize pid 1000000 (?): reading its")
    assert "CAP_SYS_PTRACE" in lines[0] and "stacks_unreadable_process" in lines[0]
    assert lines[-1].startswith("tcptrace: more processes cannot be symbolized")
