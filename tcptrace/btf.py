"""Field offsets of kernel structs, read from the running kernel's BTF.

The kernel headers installed for bcc belong to another kernel (see
shared/notes/kernel.md), so every struct field the BPF code dereferences gets its
offset from /sys/kernel/btf/vmlinux instead, passed to the compiler as -D macros.

This is a small reader of the raw BTF format (Documentation/bpf/btf.rst), stdlib
only: bcc and bpftool are not needed at run time. It walks the type section once to
record where each type starts and to index struct/union names, and decodes members
only of the structs it is asked about; loading vmlinux BTF takes tens of ms.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, fields
from pathlib import Path

from tcptrace.errors import BtfError

DEFAULT_BTF_PATH = "/sys/kernel/btf/vmlinux"
# issue 7: test hook. Pointing it at a missing file simulates a kernel built
# without BTF, which no test machine here is.
BTF_PATH_ENV = "TCPTRACE_BTF_PATH"


def default_btf_path() -> str:
    """The kernel BTF to read: $TCPTRACE_BTF_PATH when set, else the running kernel's."""
    return os.environ.get(BTF_PATH_ENV) or DEFAULT_BTF_PATH

_NO_BTF_HINT = (
    "tcptrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y; "
    "boot one (most distribution kernels since 2020 are)"
)

_MAGIC = 0xEB9F
_HEADER_LEN = 24  # magic, version, flags, hdr_len, type_off/len, str_off/len
_TYPE_LEN = 12  # struct btf_type: name_off, info, size/type

# Kinds, from include/uapi/linux/btf.h.
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

# Bytes that follow struct btf_type: a fixed part plus vlen records of a fixed size.
# Kinds absent from both tables (PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT,
# TYPE_TAG) carry nothing after the 12-byte header.
_EXTRA_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_EXTRA_PER_VLEN = {
    KIND_STRUCT: 12,  # btf_member: name_off, type, offset
    KIND_UNION: 12,
    KIND_ENUM: 8,  # btf_enum: name_off, val
    KIND_FUNC_PROTO: 8,  # btf_param: name_off, type
    KIND_DATASEC: 12,  # btf_var_secinfo: type, offset, size
    KIND_ENUM64: 12,  # btf_enum64: name_off, val_lo32, val_hi32
}
_MAX_KIND = KIND_ENUM64

# Modifiers that name another type and add nothing to its layout.
_TRANSPARENT = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
# Kinds whose size field is the byte size.
_SIZED = frozenset(
    {KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_DATASEC}
)
_COMPOSITE = frozenset({KIND_STRUCT, KIND_UNION})
# BTF does not record pointer width; tcptrace only targets 64-bit kernels.
_POINTER_SIZE = 8
# Guard against typedef cycles and absurd nesting in a corrupt file.
_MAX_CHAIN = 64


@dataclass(frozen=True)
class MemberOffset:
    """Where `struct.member` lives: byte offset from the start of the struct, byte size."""

    struct: str
    member: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Found:
    bit_offset: int
    type_id: int
    bitfield_size: int


class KernelBtf:
    """Parsed BTF (base BTF, such as vmlinux) with struct member look-up."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self._data = data
        if len(data) < _HEADER_LEN:
            raise BtfError(f"BTF {source} is truncated ({len(data)} bytes)")
        magic = struct.unpack_from("<H", data, 0)[0]
        if magic == _MAGIC:
            self._endian = "<"
        elif magic == 0x9FEB:
            self._endian = ">"
        else:
            raise BtfError(f"{source} is not BTF (magic {magic:#06x})")
        e = self._endian
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(e + "5I", data, 4)
        # Section offsets count from the end of the header, whose length may grow.
        body = hdr_len
        if (
            hdr_len < _HEADER_LEN
            or body + type_off + type_len > len(data)
            or body + str_off + str_len > len(data)
        ):
            raise BtfError(f"BTF {source} has a header that does not fit the file")
        self._strs = data[body + str_off : body + str_off + str_len]
        self._type_start = body + type_off
        self._type_end = self._type_start + type_len
        self._hdr = struct.Struct(e + "III")
        self._u32 = struct.Struct(e + "I")
        self._starts = array("Q", [0])  # byte offset of each type id; id 0 is void
        self._structs: dict[str, list[int]] = {}
        self._unions: dict[str, list[int]] = {}
        self._index()

    @classmethod
    def load(cls, path: str | Path | None = None) -> KernelBtf:
        """Read and index a BTF file (default: `default_btf_path()`); BtfError when it
        is missing, unreadable or corrupt."""
        if path is None:
            path = default_btf_path()
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise BtfError(f"no kernel BTF at {path}", hint=_NO_BTF_HINT) from exc
        except OSError as exc:
            raise BtfError(
                f"cannot read kernel BTF at {path}: {exc.strerror or exc}", hint=_NO_BTF_HINT
            ) from exc
        return cls(data, source=str(path))

    def _index(self) -> None:
        # One pass over every type: only the header of each is decoded, to learn its
        # length; names are decoded for structs and unions alone.
        data = self._data
        unpack = self._hdr.unpack_from
        starts = self._starts
        structs = self._structs
        unions = self._unions
        strs = self._strs
        fixed = _EXTRA_FIXED
        per_vlen = _EXTRA_PER_VLEN
        composite = _COMPOSITE
        off = self._type_start
        end = self._type_end
        try:
            while off < end:
                name_off, info, _ = unpack(data, off)
                kind = (info >> 24) & 0x1F
                if kind in composite:
                    if name_off:
                        name = strs[name_off : strs.index(0, name_off)].decode()
                        table = structs if kind == KIND_STRUCT else unions
                        ids = table.get(name)
                        if ids is None:
                            table[name] = [len(starts)]
                        else:
                            ids.append(len(starts))
                    starts.append(off)
                    off += _TYPE_LEN + 12 * (info & 0xFFFF)
                    continue
                if kind > _MAX_KIND or kind == 0:
                    raise BtfError(
                        f"BTF {self.source}: unknown kind {kind} at type id {len(starts)}",
                        hint="tcptrace's BTF reader predates this kernel",
                    )
                starts.append(off)
                off += _TYPE_LEN + fixed.get(kind, 0) + per_vlen.get(kind, 0) * (info & 0xFFFF)
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise BtfError(f"BTF {self.source} is corrupt near byte {off}: {exc}") from exc
        if off != end:
            raise BtfError(f"BTF {self.source}: type section overruns its length")

    # -- low-level decoding -------------------------------------------------------

    @property
    def type_count(self) -> int:
        """Number of types, not counting void (id 0)."""
        return len(self._starts) - 1

    def _type(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(name_off, kind, kind_flag, vlen, size_or_type) of a type id."""
        if not 0 < type_id < len(self._starts):
            raise BtfError(f"BTF {self.source}: type id {type_id} out of range")
        name_off, info, size_or_type = self._hdr.unpack_from(self._data, self._starts[type_id])
        return name_off, (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, size_or_type

    def _name(self, name_off: int) -> str:
        strs = self._strs
        return strs[name_off : strs.index(0, name_off)].decode()

    def _strip(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(_MAX_CHAIN):
            if type_id == 0:
                return 0
            _, kind, _, _, ref = self._type(type_id)
            if kind not in _TRANSPARENT:
                return type_id
            type_id = ref
        raise BtfError(f"BTF {self.source}: modifier chain too long at type id {type_id}")

    def _size(self, type_id: int, depth: int = 0) -> int:
        tid = self._strip(type_id)
        if tid == 0:
            raise BtfError(f"BTF {self.source}: type id {type_id} is void and has no size")
        _, kind, _, _, size_or_type = self._type(tid)
        if kind in _SIZED:
            return size_or_type
        if kind == KIND_PTR:
            return _POINTER_SIZE
        if kind == KIND_ARRAY and depth < _MAX_CHAIN:
            elem, _, nelems = self._hdr.unpack_from(self._data, self._starts[tid] + _TYPE_LEN)
            return nelems * self._size(elem, depth + 1) if nelems else 0
        raise BtfError(f"BTF {self.source}: type id {tid} (kind {kind}) has no size")

    def _int_is_partial(self, type_id: int) -> bool:
        """True for an INT narrower than its storage: the pre-kind_flag bitfield encoding."""
        tid = self._strip(type_id)
        if tid == 0:
            return False
        _, kind, _, _, size = self._type(tid)
        if kind != KIND_INT:
            return False
        enc = self._u32.unpack_from(self._data, self._starts[tid] + _TYPE_LEN)[0]
        return bool((enc >> 16) & 0xFF) or (enc & 0xFF) != size * 8

    def _members(self, type_id: int) -> list[tuple[int, int, int, int]]:
        """(name_off, type_id, bit_offset, bitfield_size) of each member of a struct/union."""
        _, _, kind_flag, vlen, _ = self._type(type_id)
        base = self._starts[type_id] + _TYPE_LEN
        out = []
        for name_off, mtype, moff in struct.iter_unpack(
            self._endian + "III", self._data[base : base + 12 * vlen]
        ):
            if kind_flag:
                out.append((name_off, mtype, moff & 0xFFFFFF, moff >> 24))
            else:
                out.append((name_off, mtype, moff, 0))
        return out

    def _find(self, type_id: int, name: str, depth: int = 0) -> _Found | None:
        """Look `name` up among the members of a struct/union, descending into anonymous
        struct/union members the way C does (their members belong to the parent)."""
        wanted = name.encode()
        for name_off, mtype, bit_off, bf_size in self._members(type_id):
            if name_off:
                strs = self._strs
                if strs[name_off : name_off + len(wanted) + 1] == wanted + b"\0":
                    if not bf_size and self._int_is_partial(mtype):
                        bf_size = -1  # old encoding: width lives in the INT type
                    return _Found(bit_off, mtype, bf_size)
                continue
            inner = self._strip(mtype)
            if inner and depth < _MAX_CHAIN and self._type(inner)[1] in _COMPOSITE:
                found = self._find(inner, name, depth + 1)
                if found is not None:
                    return _Found(bit_off + found.bit_offset, found.type_id, found.bitfield_size)
        return None

    # -- public API ---------------------------------------------------------------

    def has_struct(self, name: str) -> bool:
        """True when a struct (or, failing that, a union) of this name is defined."""
        return name in self._structs or name in self._unions

    def struct_names(self) -> list[str]:
        """Names of every named struct, sorted; for diagnostics."""
        return sorted(self._structs)

    def member(self, struct: str, path: str) -> MemberOffset:
        """Byte offset and size of `path` (e.g. "__sk_common.skc_daddr") in `struct`.

        Raises BtfError when the struct or member is missing, or the member is a
        bitfield or not byte aligned (it cannot be read as a plain scalar then).
        """
        parts = path.split(".")
        if not path or not all(parts):
            raise BtfError(f"bad member path {path!r} for struct {struct}")
        candidates = self._structs.get(struct) or self._unions.get(struct)
        if not candidates:
            raise BtfError(
                f"struct {struct} not found in BTF {self.source}",
                hint="this kernel may be too old or too new for tcptrace",
            )
        # A name can be defined more than once (e.g. a forward-declared struct that
        # dedup left in two copies); accept it when every definition agrees.
        results: set[MemberOffset] = set()
        errors: list[BtfError] = []
        for type_id in candidates:
            try:
                results.add(self._member_of(type_id, struct, path, parts))
            except BtfError as exc:
                errors.append(exc)
        if len(results) == 1:
            return results.pop()
        if results:
            layouts = ", ".join(
                f"offset {r.offset} size {r.size}"
                for r in sorted(results, key=lambda r: (r.offset, r.size))
            )
            raise BtfError(
                f"struct {struct} is defined {len(candidates)} times in BTF {self.source} "
                f"with different layouts of {path}: {layouts}"
            )
        raise errors[0]

    def _member_of(self, type_id: int, struct: str, path: str, parts: list[str]) -> MemberOffset:
        bit_offset = 0
        current = type_id
        found: _Found | None = None
        for i, part in enumerate(parts):
            if i:
                assert found is not None
                current = self._strip(found.type_id)
                if not current or self._type(current)[1] not in _COMPOSITE:
                    prefix = ".".join(parts[:i])
                    raise BtfError(
                        f"{struct}.{prefix} is not a struct or union, so it has no member {part}"
                    )
            found = self._find(current, part)
            if found is None:
                where = f"{struct}.{'.'.join(parts[:i])}" if i else f"struct {struct}"
                raise BtfError(
                    f"{where} has no member {part} in BTF {self.source}"
                    + (f" (looking up {path})" if len(parts) > 1 else ""),
                    hint="this kernel may be too old or too new for tcptrace",
                )
            if found.bitfield_size:
                raise BtfError(
                    f"{struct}.{'.'.join(parts[: i + 1])} is a bitfield; "
                    "tcptrace can only read whole-byte members"
                )
            bit_offset += found.bit_offset
        assert found is not None
        if bit_offset % 8:
            raise BtfError(f"{struct}.{path} is not byte aligned (bit offset {bit_offset})")
        return MemberOffset(struct, path, bit_offset // 8, self._size(found.type_id))


@dataclass(frozen=True)
class KernelOffsets:
    """Everything the BPF program needs from BTF; field names are the C macro names."""

    TT_OFF_TASK_FILES: int
    TT_OFF_TASK_TGID: int
    TT_OFF_FILES_FDT: int
    TT_OFF_FDT_FD: int
    TT_OFF_FDT_MAX_FDS: int
    TT_OFF_FILE_PRIVATE_DATA: int
    TT_OFF_SOCKET_SK: int
    TT_OFF_SK_FAMILY: int
    TT_OFF_SK_STATE: int
    TT_OFF_SK_NUM: int
    TT_OFF_SK_DPORT: int
    TT_OFF_SK_DADDR: int
    TT_OFF_SK_RCV_SADDR: int
    TT_OFF_SK_V6_DADDR: int
    TT_OFF_SK_V6_RCV_SADDR: int
    TT_OFF_SK_PROTOCOL: int
    TT_OFF_SK_TYPE: int
    TT_OFF_TCP_BYTES_ACKED: int
    TT_OFF_TCP_BYTES_RECEIVED: int
    # Widths of the fields whose C type has changed across kernels (sk_protocol and
    # sk_type were bitfields before 5.6); the BPF code reads them with these sizes.
    TT_SIZE_SK_FAMILY: int
    TT_SIZE_SK_STATE: int
    TT_SIZE_SK_PROTOCOL: int
    TT_SIZE_SK_TYPE: int
    # Where the saved user registers of a syscall hold its number and first argument
    # (x86-64 pt_regs.orig_ax and .di), or -1 where tcptrace does not use them: the
    # BPF side then learns connect()/listen() fds from syscall tracepoints instead.
    TT_OFF_REGS_SYSCALL_NR: int = -1
    TT_OFF_REGS_ARG1: int = -1

    def as_dict(self) -> dict[str, int]:
        """Macro name -> value, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_cflags(self) -> list[str]:
        """["-DTT_OFF_TASK_FILES=1824", ...] for bcc's cflags."""
        return [f"-D{name}={value}" for name, value in self.as_dict().items()]


# macro -> (struct, member path, size the BPF code assumes, or None when it reads
# the size from the matching TT_SIZE_ macro).
OFFSET_SPECS: dict[str, tuple[str, str, int | None]] = {
    "TT_OFF_TASK_FILES": ("task_struct", "files", 8),
    "TT_OFF_TASK_TGID": ("task_struct", "tgid", 4),
    "TT_OFF_FILES_FDT": ("files_struct", "fdt", 8),
    "TT_OFF_FDT_FD": ("fdtable", "fd", 8),
    "TT_OFF_FDT_MAX_FDS": ("fdtable", "max_fds", 4),
    "TT_OFF_FILE_PRIVATE_DATA": ("file", "private_data", 8),
    "TT_OFF_SOCKET_SK": ("socket", "sk", 8),
    "TT_OFF_SK_FAMILY": ("sock", "__sk_common.skc_family", None),
    "TT_OFF_SK_STATE": ("sock", "__sk_common.skc_state", None),
    "TT_OFF_SK_NUM": ("sock", "__sk_common.skc_num", 2),
    "TT_OFF_SK_DPORT": ("sock", "__sk_common.skc_dport", 2),
    "TT_OFF_SK_DADDR": ("sock", "__sk_common.skc_daddr", 4),
    "TT_OFF_SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr", 4),
    "TT_OFF_SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr", 16),
    "TT_OFF_SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr", 16),
    "TT_OFF_SK_PROTOCOL": ("sock", "sk_protocol", None),
    "TT_OFF_SK_TYPE": ("sock", "sk_type", None),
    "TT_OFF_TCP_BYTES_ACKED": ("tcp_sock", "bytes_acked", 8),
    "TT_OFF_TCP_BYTES_RECEIVED": ("tcp_sock", "bytes_received", 8),
}
SIZE_OF: dict[str, str] = {
    "TT_SIZE_SK_FAMILY": "TT_OFF_SK_FAMILY",
    "TT_SIZE_SK_STATE": "TT_OFF_SK_STATE",
    "TT_SIZE_SK_PROTOCOL": "TT_OFF_SK_PROTOCOL",
    "TT_SIZE_SK_TYPE": "TT_OFF_SK_TYPE",
}
# bpf_probe_read_kernel into a u8/u16/u32/u64 handles only these widths.
_SCALAR_SIZES = frozenset({1, 2, 4, 8})


def kernel_offsets(btf: KernelBtf | None = None) -> KernelOffsets:
    """Resolve every offset the BPF program needs; BtfError names the first one missing
    or of an unexpected width (reading it with the wrong width would give garbage)."""
    if btf is None:
        btf = KernelBtf.load()
    values: dict[str, int] = {}
    found: dict[str, MemberOffset] = {}
    for macro, (struct_name, path, want_size) in OFFSET_SPECS.items():
        m = btf.member(struct_name, path)
        if want_size is not None and m.size != want_size:
            raise BtfError(
                f"{struct_name}.{path} is {m.size} bytes in BTF {btf.source}, "
                f"tcptrace expects {want_size}"
            )
        values[macro] = m.offset
        found[macro] = m
    for macro, off_macro in SIZE_OF.items():
        m = found[off_macro]
        if m.size not in _SCALAR_SIZES:
            raise BtfError(
                f"{m.struct}.{m.member} is {m.size} bytes in BTF {btf.source}, "
                "not a scalar tcptrace can read"
            )
        values[macro] = m.size
    values.update(syscall_register_offsets(btf))
    return KernelOffsets(**values)


# x86-64 only: elsewhere the register names differ, and nothing here was verified.
_SYSCALL_REGISTERS = {"x86_64": ("orig_ax", "di")}
# bpf_get_current_task_btf (5.11) and bpf_task_pt_regs (5.15) read them.
_TASK_PT_REGS_SINCE = (5, 15)


def syscall_register_offsets(
    btf: KernelBtf, machine: str | None = None, release: str | None = None
) -> dict[str, int]:
    """TT_OFF_REGS_* where this kernel lets BPF read a syscall's saved registers,
    else {} (the defaults, -1, select the syscall tracepoints)."""
    import platform

    names = _SYSCALL_REGISTERS.get(machine or platform.machine())
    if names is None or _release_tuple(release or platform.release()) < _TASK_PT_REGS_SINCE:
        return {}
    try:
        nr, arg1 = (btf.member("pt_regs", name) for name in names)
    except BtfError:
        return {}
    if nr.size != 8 or arg1.size != 8:
        return {}
    return {"TT_OFF_REGS_SYSCALL_NR": nr.offset, "TT_OFF_REGS_ARG1": arg1.offset}


def _release_tuple(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)
