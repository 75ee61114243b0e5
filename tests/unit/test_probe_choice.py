"""--probes auto|kprobe|tracepoint decided from (faked) kernel facts; the kprobe
attach table against bpf/kprobes.bpf.c. No root, no bcc."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tcptrace import system
from tcptrace.errors import KernelSupportError
from tcptrace.probes import (
    KPROBE_ATTACHMENTS,
    KRETPROBE_MAXACTIVE,
    ProbeSet,
    bpf_source,
)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


class FakeKernel:
    """Tracefs, kallsyms and blacklist of a made-up kernel."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        kprobes: bool = True,
        tracepoints: bool = True,
        symbols: tuple[str, ...] = system.KPROBE_FUNCTIONS,
        blacklist: tuple[str, ...] = (),
    ) -> None:
        self.root = tmp_path / "tracing"
        (self.root / "events").mkdir(parents=True)
        (self.root / "available_events").write_text("")
        if kprobes:
            (self.root / "kprobe_events").write_text("")
        if tracepoints:
            for cat, name in (("sock", "inet_sock_set_state"), ("tcp", "tcp_destroy_sock")):
                (self.root / "events" / cat / name).mkdir(parents=True)
        self.kallsyms = tmp_path / "kallsyms"
        lines = [f"ffffffff8100{i:04x} T {s}" for i, s in enumerate(symbols)]
        lines += ["ffffffff82000000 D tcp_hashinfo", "ffffffffc0000000 t nf_hook\t[nf_tables]"]
        self.kallsyms.write_text("\n".join(lines) + "\n")
        self.blacklist = tmp_path / "blacklist"
        self.blacklist.write_text(
            "".join(f"0xffffffff81000000-0xffffffff81000010\t{b}\n" for b in blacklist)
        )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(system, "TRACEFS_CANDIDATES", (str(self.root),))
        monkeypatch.setattr(system, "KALLSYMS", str(self.kallsyms))
        monkeypatch.setattr(system, "KPROBE_BLACKLIST", str(self.blacklist))


def test_auto_picks_kprobes_when_every_target_is_traceable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeKernel(tmp_path).install(monkeypatch)
    picked, why = system.choose_probe_set("auto")
    assert picked == "kprobe"
    assert why.startswith("auto: kprobes available and tcp_set_state, tcp_connect")
    assert system.choose_probe_set("kprobe") == ("kprobe", "requested with --probes kprobe")
    assert system.choose_probe_set("tracepoint")[0] == "tracepoint"


def test_no_kprobes_auto_says_why_and_kprobe_is_an_exit_5_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeKernel(tmp_path, kprobes=False).install(monkeypatch)
    picked, why = system.choose_probe_set("auto")
    assert picked == "tracepoint"
    assert why == (
        "auto: kprobe set unavailable, this kernel has no kprobes "
        "(CONFIG_KPROBES is off: tracefs has no kprobe_events)"
    )
    with pytest.raises(KernelSupportError) as info:
        system.choose_probe_set("kprobe")
    assert info.value.exit_code == 5
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("kprobe probe set unavailable: this kernel has no kprobes")


def test_inlined_tcp_set_state_falls_back_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a compiler clone of it survives: no symbol of the exact name to attach to.
    symbols = tuple(s for s in system.KPROBE_FUNCTIONS if s != "tcp_set_state")
    FakeKernel(tmp_path, symbols=(*symbols, "tcp_set_state.isra.0")).install(monkeypatch)
    picked, why = system.choose_probe_set("auto")
    assert picked == "tracepoint"
    assert "tcp_set_state is not traceable here" in why and "inlined" in why
    with pytest.raises(KernelSupportError, match="tcp_set_state is not traceable"):
        system.choose_probe_set("kprobe")


def test_blacklisted_target_and_module_symbols(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(tmp_path, blacklist=("tcp_close",))
    kernel.install(monkeypatch)
    assert "tcp_close is on the kprobe blacklist" in system.choose_probe_set("auto")[1]
    symbols = system.kernel_text_symbols(str(kernel.kallsyms))
    assert symbols is not None
    # Data symbols and module functions are not core-kernel functions.
    assert "tcp_hashinfo" not in symbols and "nf_hook" not in symbols
    assert system.kernel_text_symbols(str(tmp_path / "missing")) is None


def test_neither_set_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeKernel(tmp_path, kprobes=False, tracepoints=False).install(monkeypatch)
    with pytest.raises(KernelSupportError, match="no usable probe set"):
        system.choose_probe_set("auto")
    with pytest.raises(KernelSupportError, match="unknown probe set"):
        system.choose_probe_set("fentry")


def test_attach_table_matches_the_c_source_and_the_checked_functions() -> None:
    source = (BPF_DIR / "kprobes.bpf.c").read_text()
    assert {a.function for a in KPROBE_ATTACHMENTS} == set(system.KPROBE_FUNCTIONS)
    defined = set(re.findall(r"^int (\w+)\(struct pt_regs \*ctx\)$", source, re.M))
    assert defined == {a.program for a in KPROBE_ATTACHMENTS}
    # bcc auto-attaches kprobe__/kretprobe__ functions with default settings: none here.
    assert not re.search(r"\bkret?probe__\w+\s*\(", source)
    rets = {a.function: a.maxactive for a in KPROBE_ATTACHMENTS if a.is_return}
    assert rets == {"inet_csk_listen_start": 0, "inet_csk_accept": KRETPROBE_MAXACTIVE}
    # More than the kernel's default pool (max(10, 2 * ncpu)), at most its maximum.
    assert 10 < KRETPROBE_MAXACTIVE <= 4096


@pytest.mark.parametrize("probe_set", list(ProbeSet))
def test_shared_header_is_spliced_in_with_line_markers(probe_set: ProbeSet) -> None:
    text, include_dir = bpf_source(probe_set)
    assert '#include "common.bpf.h"' not in text
    assert "TRACEPOINT_PROBE(syscalls, sys_enter_close)" in text  # from the header
    assert Path(include_dir, "tcptrace.h").is_file()
    name = "kprobes.bpf.c" if probe_set is ProbeSet.KPROBE else "tracepoints.bpf.c"
    original = (BPF_DIR / name).read_text().splitlines()
    include_line = original.index('#include "common.bpf.h"') + 1
    lines = text.splitlines()
    marker = lines.index(f'#line {include_line + 1} "{name}"')
    # After the marker, the text is the rest of the file, line for line.
    assert lines[marker + 1 :] == original[include_line:]
    assert lines[0 : include_line - 1] == original[: include_line - 1]
    assert lines[include_line - 1] == '#line 1 "common.bpf.h"'


def test_kretprobe_misses_counts_only_our_return_probes(tmp_path: Path) -> None:
    from tcptrace.probes import kretprobe_misses

    profile = tmp_path / "kprobe_profile"
    profile.write_text(
        "  r_inet_csk_accept_bcc_4242                          17               3\n"
        "  p_tcp_close_bcc_4242                                 9               5\n"
        "  r_inet_csk_accept_bcc_777                            4               8\n"
        "  garbage line\n"
    )
    assert kretprobe_misses(4242, str(profile)) == 3
    assert kretprobe_misses(1, str(profile)) == 0
    assert kretprobe_misses(4242, str(tmp_path / "absent")) == 0
