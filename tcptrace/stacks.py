"""Stack ids to symbolized frames, cached, resolved while the process still lives.

Symbols come from bcc (through callables handed in by the caller, so this module
never imports bcc); file:line comes from binutils' addr2line on the mapped
binary, when it has DWARF. A process that exits takes its address space with
it, so births are symbolized as they arrive.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tcptrace.sockets import StackStatus
from tcptrace.system import inspection_denied

UNKNOWN_SYMBOL = "[unknown]"


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """Executable file mappings of /proc/PID/maps."""
    maps: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        lo, hi = parts[0].split("-")
        maps.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), parts[5].strip()))
    return maps


def _elf_is_exec_and_loads(path: str) -> tuple[bool, list[tuple[int, int, int]]]:
    """(ET_EXEC?, [(p_offset, p_vaddr, p_filesz)] of PT_LOAD segments) of a 64-bit ELF."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise ValueError("not a 64-bit ELF")
        e_type = struct.unpack_from("<H", head, 16)[0]
        e_phoff = struct.unpack_from("<Q", head, 32)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        fh.seek(e_phoff)
        table = fh.read(e_phentsize * e_phnum)
    loads = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * e_phentsize
        )
        if p_type == 1:
            loads.append((p_offset, p_vaddr, p_filesz))
    return e_type == 2, loads


class LineResolver:
    """Runtime address -> "file:line" via addr2line, cached per binary address."""

    def __init__(self) -> None:
        self._addr2line = shutil.which("addr2line")
        self._elf: dict[str, tuple[bool, list[tuple[int, int, int]]] | None] = {}
        self._cache: dict[tuple[str, int], str] = {}

    @property
    def available(self) -> bool:
        return self._addr2line is not None

    def file_address(self, addr: int, maps: list[Mapping]) -> tuple[str, int] | None:
        for m in maps:
            if m.start <= addr < m.end:
                info = self._elf_info(m.path)
                if info is None:
                    return None
                is_exec, loads = info
                if is_exec:
                    return m.path, addr
                file_off = addr - m.start + m.offset
                for p_offset, p_vaddr, p_filesz in loads:
                    if p_offset <= file_off < p_offset + p_filesz:
                        return m.path, file_off - p_offset + p_vaddr
                return m.path, file_off
        return None

    def _elf_info(self, path: str) -> tuple[bool, list[tuple[int, int, int]]] | None:
        if path not in self._elf:
            try:
                self._elf[path] = _elf_is_exec_and_loads(path)
            except (OSError, ValueError, struct.error):
                self._elf[path] = None
        return self._elf[path]

    def lines(self, path: str, addrs: list[int]) -> dict[int, str]:
        """file:line for each address (missing when unknown). One subprocess per batch."""
        todo = [a for a in addrs if (path, a) not in self._cache]
        if todo and self._addr2line is not None:
            try:
                out = subprocess.run(
                    [self._addr2line, "-e", path, *[hex(a) for a in todo]],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=False,
                ).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                out = []
            for addr, line in zip(todo, out + [""] * (len(todo) - len(out)), strict=True):
                line = line.split(" (discriminator")[0].strip()
                self._cache[(path, addr)] = "" if line.startswith("??") else line
        return {a: self._cache.get((path, a), "") for a in addrs}


class StackSymbolizer:
    """Resolves (tgid, stack id) to frames, outermost caller first.

    `addresses(stack_id)` returns raw user addresses innermost first (bcc's
    order); `symbol(addr, pid)` returns (name, module). Both come from the
    capture so this module stays free of bcc.

    A stack with no name at all is a loss, counted by cause: `stacks_unreadable_process`
    when tcptrace may not read the process (`denied`: another user's or a
    non-dumpable process, e.g. a --follow-forks child that dropped privileges,
    without CAP_SYS_PTRACE), else `stacks_unsymbolized`. `on_unreadable(pid)` is
    told once per such process, so the user can be told which and why.
    """

    def __init__(
        self,
        addresses: Callable[[int], list[int]],
        symbol: Callable[[int, int], tuple[str, str]],
        with_lines: bool = True,
        proc_root: str = "/proc",
        kernel_symbol: Callable[[int], str] | None = None,
        denied: Callable[[int], bool] = inspection_denied,
        on_unreadable: Callable[[int], None] | None = None,
    ) -> None:
        self._addresses = addresses
        self._symbol = symbol
        self._kernel_symbol = kernel_symbol
        self._lines = LineResolver() if with_lines else None
        self._proc = proc_root
        self._cache: dict[tuple[int, int, int], tuple[tuple[str, ...], StackStatus]] = {}
        self._denied = denied
        self._on_unreadable = on_unreadable
        self._unreadable: set[int] = set()  # processes already reported
        self.counters: Counter[str] = Counter(
            {"stacks_unsymbolized": 0, "stacks_unreadable_process": 0}
        )

    def resolve(
        self, tgid: int, stack_id: int, kernel_stack_id: int = -1
    ) -> tuple[tuple[str, ...], StackStatus]:
        """Frames outermost first; kernel frames (when captured) last, as "[k] name"."""
        key = (tgid, stack_id, kernel_stack_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if stack_id < 0:
            result: tuple[tuple[str, ...], StackStatus] = ((), StackStatus.FAILED)
        else:
            result = self._resolve(tgid, stack_id)
        if kernel_stack_id >= 0 and self._kernel_symbol is not None:
            # Innermost last, like the user part: the kernel runs below the syscall.
            kernel = [f"[k] {self._kernel_symbol(a)}" for a in self._addresses(kernel_stack_id)]
            result = (result[0] + tuple(reversed(kernel)), result[1])
        self._cache[key] = result
        return result

    def forget_process(self, tgid: int) -> None:
        """Drop cached stacks of an exited process (its pid may come back as another)."""
        for key in [k for k in self._cache if k[0] == tgid]:
            del self._cache[key]
        self._unreadable.discard(tgid)

    def _resolve(self, tgid: int, stack_id: int) -> tuple[tuple[str, ...], StackStatus]:
        addrs = self._addresses(stack_id)
        if not addrs:
            self.counters["stacks_unsymbolized"] += 1
            return (), StackStatus.FAILED
        names = [self._symbol(a, tgid)[0] for a in addrs]
        locations = self._locations(tgid, addrs)
        frames = []
        for addr, name in zip(addrs, names, strict=True):
            label = name if name and name != UNKNOWN_SYMBOL else f"0x{addr:x}"
            loc = locations.get(addr, "")
            frames.append(f"{label} ({loc})" if loc else label)
        frames.reverse()  # folded-stack order: outermost caller first
        if all(n in ("", UNKNOWN_SYMBOL) for n in names):
            if self._denied(tgid):
                self.counters["stacks_unreadable_process"] += 1
                if tgid not in self._unreadable:
                    self._unreadable.add(tgid)
                    if self._on_unreadable is not None:
                        self._on_unreadable(tgid)
            else:
                self.counters["stacks_unsymbolized"] += 1
            return tuple(frames), StackStatus.UNSYMBOLIZED
        return tuple(frames), StackStatus.OK

    def _locations(self, tgid: int, addrs: list[int]) -> dict[int, str]:
        if self._lines is None or not self._lines.available:
            return {}
        try:
            with open(os.path.join(self._proc, str(tgid), "maps")) as fh:
                maps = parse_maps(fh.read())
        except OSError:
            return {}
        by_path: dict[str, dict[int, int]] = {}
        for addr in addrs:
            where = self._lines.file_address(addr, maps)
            if where is not None:
                by_path.setdefault(where[0], {})[addr] = where[1]
        result: dict[int, str] = {}
        for path, addr_map in by_path.items():
            # Return addresses point after the call: step back one byte to the call.
            lines = self._lines.lines(path, [max(v - 1, 0) for v in addr_map.values()])
            for addr, vaddr in addr_map.items():
                line = lines.get(max(vaddr - 1, 0), "")
                if line:
                    result[addr] = line
        return result
