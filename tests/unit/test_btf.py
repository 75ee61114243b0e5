"""tcptrace.btf against small BTF blobs built here, byte by byte, from the format spec
(Documentation/bpf/btf.rst), so no kernel or root is needed."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import pytest

from tcptrace.btf import KernelBtf, KernelOffsets, MemberOffset, kernel_offsets
from tcptrace.errors import BtfError, KernelSupportError

# Kind numbers, restated from include/uapi/linux/btf.h rather than imported, so a
# wrong constant in btf.py cannot hide itself.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

Member = tuple[str, int, int] | tuple[str, int, int, int]  # name, type, bit offset[, bits]


class BtfBuilder:
    """Appends types in order (ids from 1) and serializes a complete BTF blob."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def _add(
        self,
        name: str,
        kind: int,
        vlen: int,
        size_or_type: int,
        extra: bytes = b"",
        kind_flag: int = 0,
    ) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack(self.e + "III", self.s(name), info, size_or_type) + extra)
        return len(self.types)

    def int_(
        self,
        name: str,
        size: int,
        nr_bits: int | None = None,
        bit_off: int = 0,
        signed: bool = False,
    ) -> int:
        bits = size * 8 if nr_bits is None else nr_bits
        enc = (int(signed) << 24) | (bit_off << 16) | bits
        return self._add(name, INT, 0, size, struct.pack(self.e + "I", enc))

    def ptr(self, target: int) -> int:
        return self._add("", PTR, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add("", ARRAY, 0, 0, struct.pack(self.e + "III", elem, index, nelems))

    def composite(
        self, kind: int, name: str, size: int, members: list[Member], kind_flag: int = 0
    ) -> int:
        extra = b""
        for m in members:
            bits = m[3] if len(m) == 4 else 0
            off = (bits << 24) | m[2] if kind_flag else m[2]
            extra += struct.pack(self.e + "III", self.s(m[0]), m[1], off)
        return self._add(name, kind, len(members), size, extra, kind_flag)

    def struct_(self, name: str, size: int, members: list[Member], kind_flag: int = 0) -> int:
        return self.composite(STRUCT, name, size, members, kind_flag)

    def union(self, name: str, size: int, members: list[Member], kind_flag: int = 0) -> int:
        return self.composite(UNION, name, size, members, kind_flag)

    def ref(self, kind: int, target: int, name: str = "") -> int:
        """TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG, FUNC: a name and a type id."""
        return self._add(name, kind, 0, target)

    def enum(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack(self.e + "Ii", self.s(k), v) for k, v in values.items())
        return self._add(name, ENUM, len(values), 4, extra)

    def enum64(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(
            struct.pack(self.e + "III", self.s(k), v & 0xFFFFFFFF, v >> 32)
            for k, v in values.items()
        )
        return self._add(name, ENUM64, len(values), 8, extra)

    def fwd(self, name: str) -> int:
        return self._add(name, FWD, 0, 0)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack(self.e + "II", self.s(n), t) for n, t in params)
        return self._add("", FUNC_PROTO, len(params), ret, extra)

    def var(self, name: str, type_id: int) -> int:
        return self._add(name, VAR, 0, type_id, struct.pack(self.e + "I", 1))

    def datasec(self, name: str, size: int, entries: list[tuple[int, int, int]]) -> int:
        extra = b"".join(struct.pack(self.e + "III", *v) for v in entries)
        return self._add(name, DATASEC, len(entries), size, extra)

    def float_(self, name: str, size: int) -> int:
        return self._add(name, FLOAT, 0, size)

    def decl_tag(self, name: str, target: int, component: int) -> int:
        return self._add(name, DECL_TAG, 0, target, struct.pack(self.e + "i", component))

    def raw(self, kind: int) -> int:
        return self._add("", kind, 0, 0)

    def blob(self, hdr_extra: bytes = b"") -> bytes:
        types = b"".join(self.types)
        hdr_len = 24 + len(hdr_extra)
        header = struct.pack(
            self.e + "HBBIIIII",
            0xEB9F,
            1,
            0,
            hdr_len,
            0,
            len(types),
            len(types),
            len(self.strings),
        )
        return header + hdr_extra + types + bytes(self.strings)


def every_kind(b: BtfBuilder) -> None:
    """One type of every kind, with non-zero vlen where the kind has records, so that a
    reader that skips any of them by the wrong length misplaces every later type."""
    u32 = b.int_("unsigned int", 4)
    b.ptr(u32)
    b.array(u32, u32, 3)
    b.struct_("filler", 8, [("a", u32, 0), ("b", u32, 32)])
    b.union("ufiller", 4, [("a", u32, 0), ("b", u32, 0)])
    b.enum("colour", {"RED": 0, "GREEN": 1, "BLUE": -1})
    b.fwd("opaque")
    b.ref(TYPEDEF, u32, "u32_t")
    b.ref(VOLATILE, u32)
    b.ref(CONST, u32)
    b.ref(RESTRICT, u32)
    proto = b.func_proto(u32, [("x", u32), ("y", u32), ("", 0)])
    b.ref(FUNC, proto, "some_func")
    v = b.var("some_var", u32)
    b.datasec(".data", 8, [(v, 0, 4), (v, 4, 4)])
    b.float_("double", 8)
    b.decl_tag("tag", u32, -1)
    b.ref(TYPE_TAG, u32, "user")
    b.enum64("big", {"A": 1 << 40, "B": 2})


def sock_like(b: BtfBuilder) -> dict[str, int]:
    """struct sock_common / sock shaped like the kernel's: addresses inside an anonymous
    struct inside an anonymous union, a volatile u8 state, kind_flag bitfields."""
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("short unsigned int", 2)
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    be32 = b.ref(TYPEDEF, b.ref(TYPEDEF, u32, "__u32"), "__be32")  # __be32 -> __u32 -> u32
    addrpair = b.ref(TYPEDEF, u64, "__addrpair")
    addrs = b.struct_("", 8, [("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)])
    u_addr = b.union("", 8, [("skc_addrpair", addrpair, 0), ("", addrs, 0)])
    ports = b.struct_("", 4, [("skc_dport", u16, 0), ("skc_num", u16, 16)])
    u_ports = b.union("", 4, [("skc_portpair", u32, 0), ("", ports, 0)])
    in6 = b.struct_("in6_addr", 16, [("s6_addr", b.array(u8, u32, 16), 0)])
    vol_u8 = b.ref(VOLATILE, u8)
    sock_common = b.struct_(
        "sock_common",
        48,
        [
            ("", u_addr, 0),
            ("", u_ports, 96),
            ("skc_family", u16, 128),
            ("skc_state", vol_u8, 144),
            ("skc_reuse", u8, 152, 4),
            ("skc_reuseport", u8, 156, 1),
            ("skc_v6_daddr", in6, 192),
            ("skc_v6_rcv_saddr", in6, 320),
        ],
        kind_flag=1,
    )
    sock_ptr = b.ptr(b.fwd("sock"))
    sock = b.struct_(
        "sock",
        72,
        [
            ("__sk_common", sock_common, 0),
            ("sk_next", sock_ptr, 384),
            ("sk_type", b.ref(CONST, b.ref(TYPEDEF, u16, "u16")), 448),
            ("sk_protocol", u16, 464),
            ("sk_pad", u32, 480),
            ("sk_ring", b.array(b.ref(TYPEDEF, u32, "ring_t"), u32, 2), 512),
        ],
    )
    return {"sock": sock, "sock_common": sock_common, "u8": u8, "u16": u16, "u32": u32}


@pytest.fixture
def btf() -> KernelBtf:
    b = BtfBuilder()
    every_kind(b)
    sock_like(b)
    return KernelBtf(b.blob(), source="<test>")


def test_every_kind_is_skipped_by_its_length(btf: KernelBtf) -> None:
    # 19 types from every_kind() plus the 22 of sock_like() (fwd "sock" included).
    assert btf.type_count == 19 + 22
    assert btf.has_struct("filler")
    assert btf.has_struct("ufiller")  # unions are found too
    assert btf.member("filler", "b") == MemberOffset("filler", "b", 4, 4)
    assert btf.member("ufiller", "b") == MemberOffset("ufiller", "b", 0, 4)
    assert not btf.has_struct("opaque")  # a FWD is not a definition
    assert not btf.has_struct("colour")


def test_direct_members(btf: KernelBtf) -> None:
    assert btf.member("sock_common", "skc_family") == MemberOffset(
        "sock_common", "skc_family", 16, 2
    )
    assert btf.member("sock", "sk_protocol").offset == 58
    assert btf.member("sock", "sk_pad") == MemberOffset("sock", "sk_pad", 60, 4)


def test_anonymous_union_containing_struct(btf: KernelBtf) -> None:
    assert btf.member("sock_common", "skc_addrpair") == MemberOffset(
        "sock_common", "skc_addrpair", 0, 8
    )
    assert btf.member("sock_common", "skc_daddr") == MemberOffset("sock_common", "skc_daddr", 0, 4)
    assert btf.member("sock_common", "skc_rcv_saddr").offset == 4
    # The anonymous union sits at bit 96: its offset is added to the inner ones.
    assert btf.member("sock_common", "skc_dport") == MemberOffset("sock_common", "skc_dport", 12, 2)
    assert btf.member("sock_common", "skc_num") == MemberOffset("sock_common", "skc_num", 14, 2)


def test_dotted_path_through_named_member(btf: KernelBtf) -> None:
    m = btf.member("sock", "__sk_common.skc_rcv_saddr")
    assert m == MemberOffset("sock", "__sk_common.skc_rcv_saddr", 4, 4)
    assert btf.member("sock", "__sk_common.skc_num").offset == 14
    assert btf.member("sock", "__sk_common.skc_v6_rcv_saddr") == MemberOffset(
        "sock", "__sk_common.skc_v6_rcv_saddr", 40, 16
    )
    assert btf.member("sock", "__sk_common.skc_v6_daddr.s6_addr").size == 16
    assert btf.member("sock", "__sk_common").size == 48


def test_sizes_through_typedef_const_volatile_pointer_array(btf: KernelBtf) -> None:
    assert btf.member("sock", "__sk_common.skc_daddr").size == 4  # typedef chain
    assert btf.member("sock", "__sk_common.skc_state") == MemberOffset(
        "sock", "__sk_common.skc_state", 18, 1
    )  # volatile u8
    assert btf.member("sock", "sk_type") == MemberOffset("sock", "sk_type", 56, 2)  # const typedef
    assert btf.member("sock", "sk_next") == MemberOffset("sock", "sk_next", 48, 8)  # ptr to fwd
    assert btf.member("sock", "sk_ring") == MemberOffset("sock", "sk_ring", 64, 8)  # 2 x ring_t


def test_kind_flag_bitfield_is_refused(btf: KernelBtf) -> None:
    with pytest.raises(BtfError, match=r"sock_common\.skc_reuseport.*bitfield"):
        btf.member("sock_common", "skc_reuseport")
    with pytest.raises(BtfError, match=r"sock\.__sk_common\.skc_reuse is a bitfield"):
        btf.member("sock", "__sk_common.skc_reuse")


def test_kind_flag_member_after_bitfield_is_exact(btf: KernelBtf) -> None:
    # With kind_flag the offset word packs bitfield_size in its top byte; the
    # members after the bitfields must still come out at their plain offsets.
    assert btf.member("sock_common", "skc_v6_daddr").offset == 24
    assert btf.member("sock_common", "skc_v6_rcv_saddr").offset == 40


def test_old_style_bitfield_is_refused() -> None:
    # Without kind_flag, a bitfield is a member whose INT type is narrower than its
    # storage (nr_bits < size * 8) or starts at a bit offset.
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    three_bits = b.int_("unsigned int", 4, nr_bits=3)
    shifted = b.int_("unsigned int", 4, nr_bits=8, bit_off=8)
    b.struct_("flags", 8, [("a", three_bits, 0), ("b", shifted, 3), ("c", u32, 32)])
    btf = KernelBtf(b.blob())
    with pytest.raises(BtfError, match=r"flags\.a is a bitfield"):
        btf.member("flags", "a")
    with pytest.raises(BtfError, match=r"flags\.b is a bitfield"):
        btf.member("flags", "b")
    assert btf.member("flags", "c") == MemberOffset("flags", "c", 4, 4)


def test_missing_member_names_struct_and_member(btf: KernelBtf) -> None:
    with pytest.raises(BtfError, match=r"struct sock has no member sk_nope") as exc:
        btf.member("sock", "sk_nope")
    assert isinstance(exc.value, KernelSupportError)
    with pytest.raises(BtfError, match=r"sock\.__sk_common has no member skc_nope"):
        btf.member("sock", "__sk_common.skc_nope")
    with pytest.raises(BtfError, match=r"struct no_such_struct not found"):
        btf.member("no_such_struct", "x")
    # A path through a scalar.
    with pytest.raises(BtfError, match=r"sock\.sk_pad is not a struct or union"):
        btf.member("sock", "sk_pad.x")
    with pytest.raises(BtfError, match="bad member path"):
        btf.member("sock", "__sk_common.")


def test_member_name_is_not_matched_by_prefix(btf: KernelBtf) -> None:
    # "skc_v6" is a prefix of skc_v6_daddr in the string table; it must not match.
    with pytest.raises(BtfError, match="has no member skc_v6"):
        btf.member("sock_common", "skc_v6")


def test_big_endian_and_longer_header() -> None:
    for endian, extra in (("<", b"\0" * 8), (">", b""), (">", b"\xff" * 4)):
        b = BtfBuilder(endian)
        every_kind(b)
        sock_like(b)
        btf = KernelBtf(b.blob(hdr_extra=extra))
        assert btf.member("sock", "__sk_common.skc_dport") == MemberOffset(
            "sock", "__sk_common.skc_dport", 12, 2
        )


def test_duplicate_struct_names() -> None:
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    b.struct_("dup", 8, [("a", u32, 0), ("b", u32, 32)])
    b.struct_("dup", 8, [("a", u32, 0), ("b", u32, 32)])
    b.struct_("clash", 8, [("a", u32, 0)])
    b.struct_("clash", 8, [("a", u32, 32)])
    btf = KernelBtf(b.blob())
    assert btf.member("dup", "b").offset == 4  # identical copies agree
    with pytest.raises(BtfError, match=r"defined 2 times.*different layouts"):
        btf.member("clash", "a")


def test_corrupt_blobs() -> None:
    b = BtfBuilder()
    every_kind(b)
    good = b.blob()
    KernelBtf(good)
    with pytest.raises(BtfError, match="not BTF"):
        KernelBtf(b"\x00\x01" + good[2:])
    with pytest.raises(BtfError, match="truncated"):
        KernelBtf(good[:10])
    with pytest.raises(BtfError, match="does not fit"):
        KernelBtf(good[:-5])  # string section runs past the end
    bad = BtfBuilder()
    bad.raw(31)
    with pytest.raises(BtfError, match="unknown kind 31"):
        KernelBtf(bad.blob())
    # A vlen that runs past the type section.
    over = BtfBuilder()
    over.types.append(struct.pack("<III", 0, (STRUCT << 24) | 5, 4))
    with pytest.raises(BtfError, match="overruns"):
        KernelBtf(over.blob())


def test_load_missing_file_hints_at_config(tmp_path: Path) -> None:
    with pytest.raises(BtfError) as exc:
        KernelBtf.load(tmp_path / "vmlinux")
    assert "CONFIG_DEBUG_INFO_BTF" in str(exc.value)
    assert "vmlinux" in exc.value.message
    with pytest.raises(BtfError, match="CONFIG_DEBUG_INFO_BTF"):
        KernelBtf.load(tmp_path)  # a directory: unreadable as a file


def test_load_from_file(tmp_path: Path) -> None:
    b = BtfBuilder()
    sock_like(b)
    path = tmp_path / "vmlinux"
    path.write_bytes(b.blob())
    btf = KernelBtf.load(str(path))
    assert btf.source == str(path)
    assert btf.member("sock", "sk_protocol").offset == 58


# -- kernel_offsets on a miniature kernel --------------------------------------------


def mini_kernel(tgid_size: int = 4) -> bytes:
    b = BtfBuilder()
    every_kind(b)
    t = sock_like(b)
    u32, u16 = t["u32"], t["u16"]
    u64 = b.int_("long long unsigned int", 8)
    pid_t = b.ref(TYPEDEF, b.int_("int", tgid_size, signed=True), "pid_t")
    voidp = b.ptr(0)
    files_ptr = b.ptr(b.fwd("files_struct"))
    b.struct_("task_struct", 2000, [("tgid", pid_t, 1268 * 8), ("files", files_ptr, 1824 * 8)])
    fdt_ptr = b.ptr(b.fwd("fdtable"))
    b.struct_("files_struct", 64, [("count", u32, 0), ("fdt", fdt_ptr, 256)])
    file_pp = b.ptr(b.ptr(b.fwd("file")))
    b.struct_("fdtable", 16, [("max_fds", u32, 0), ("fd", file_pp, 64)])
    # private_data inside an anonymous union, as some kernels lay out struct file.
    anon = b.union("", 8, [("private_data", voidp, 0), ("other", u64, 0)])
    b.struct_("file", 32, [("f_count", u64, 0), ("", anon, 192)])
    b.struct_("socket", 32, [("state", u16, 0), ("sk", b.ptr(t["sock"]), 192)])
    b.struct_(
        "tcp_sock",
        2048,
        [
            ("inet_conn", t["sock"], 0),
            ("bytes_received", u64, 1752 * 8),
            ("bytes_acked", u64, 1824 * 8),
        ],
    )
    return b.blob()


def test_kernel_offsets_from_mini_kernel() -> None:
    offs = kernel_offsets(KernelBtf(mini_kernel()))
    assert isinstance(offs, KernelOffsets)
    d = offs.as_dict()
    assert d == {
        "TT_OFF_TASK_FILES": 1824,
        "TT_OFF_TASK_TGID": 1268,
        "TT_OFF_FILES_FDT": 32,
        "TT_OFF_FDT_FD": 8,
        "TT_OFF_FDT_MAX_FDS": 0,
        "TT_OFF_FILE_PRIVATE_DATA": 24,
        "TT_OFF_SOCKET_SK": 24,
        "TT_OFF_SK_FAMILY": 16,
        "TT_OFF_SK_STATE": 18,
        "TT_OFF_SK_NUM": 14,
        "TT_OFF_SK_DPORT": 12,
        "TT_OFF_SK_DADDR": 0,
        "TT_OFF_SK_RCV_SADDR": 4,
        "TT_OFF_SK_V6_DADDR": 24,
        "TT_OFF_SK_V6_RCV_SADDR": 40,
        "TT_OFF_SK_PROTOCOL": 58,
        "TT_OFF_SK_TYPE": 56,
        "TT_OFF_TCP_BYTES_ACKED": 1824,
        "TT_OFF_TCP_BYTES_RECEIVED": 1752,
        "TT_SIZE_SK_FAMILY": 2,
        "TT_SIZE_SK_STATE": 1,
        "TT_SIZE_SK_PROTOCOL": 2,
        "TT_SIZE_SK_TYPE": 2,
        # The mini kernel has no pt_regs: connect()/listen() fds from tracepoints.
        "TT_OFF_REGS_SYSCALL_NR": -1,
        "TT_OFF_REGS_ARG1": -1,
    }
    flags = offs.as_cflags()
    assert flags[0] == "-DTT_OFF_TASK_FILES=1824"
    assert "-DTT_SIZE_SK_STATE=1" in flags
    assert flags == [f"-D{k}={v}" for k, v in d.items()]
    with pytest.raises(AttributeError):
        offs.TT_OFF_TASK_FILES = 0  # type: ignore[misc]  # frozen


def test_kernel_offsets_refuses_unexpected_width() -> None:
    # BPF reads tgid as 4 bytes; a different width must stop us, not read garbage.
    with pytest.raises(BtfError, match=r"task_struct\.tgid is 8 bytes.*expects 4"):
        kernel_offsets(KernelBtf(mini_kernel(tgid_size=8)))


def test_kernel_offsets_names_missing_struct() -> None:
    b = BtfBuilder()
    sock_like(b)
    with pytest.raises(BtfError, match="struct task_struct not found"):
        kernel_offsets(KernelBtf(b.blob()))


class _RegsBtf:
    """Answers pt_regs lookups like x86-64 BTF (orig_ax at 120, di at 112)."""

    source = "fake"

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def member(self, struct_name: str, path: str) -> MemberOffset:
        offsets = {"orig_ax": 120, "di": 112}
        if struct_name != "pt_regs" or path not in offsets:
            raise BtfError(f"no {struct_name}.{path}")
        return MemberOffset(struct_name, path, offsets[path], self.size)


def test_syscall_registers_used_on_x86_64_from_5_15() -> None:
    from tcptrace.btf import syscall_register_offsets

    btf: Any = _RegsBtf()
    assert syscall_register_offsets(btf, "x86_64", "6.18.44-fc") == {
        "TT_OFF_REGS_SYSCALL_NR": 120,
        "TT_OFF_REGS_ARG1": 112,
    }
    assert syscall_register_offsets(btf, "x86_64", "5.15.0-91-generic") != {}
    # Older kernels lack bpf_task_pt_regs; other machines name registers otherwise.
    assert syscall_register_offsets(btf, "x86_64", "5.10.0-28-amd64") == {}
    assert syscall_register_offsets(btf, "aarch64", "6.1.0") == {}
    assert syscall_register_offsets(_RegsBtf(size=4), "x86_64", "6.1.0") == {}  # type: ignore[arg-type]


def test_offsets_default_to_syscall_tracepoints() -> None:
    flags = KernelOffsets(**{name: 0 for name in _REQUIRED_OFFSET_FIELDS}).as_cflags()
    assert "-DTT_OFF_REGS_ARG1=-1" in flags and "-DTT_OFF_REGS_SYSCALL_NR=-1" in flags


_REQUIRED_OFFSET_FIELDS = [
    f.name for f in dataclasses.fields(KernelOffsets) if f.default is dataclasses.MISSING
]
