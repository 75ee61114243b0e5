"""No shell is ever spawned, with user input or otherwise (issue 7).

tcptrace runs as root and handles names chosen by the traced programs (comm,
paths in stacks, report directories): every subprocess must get an argv list,
never a command line a shell would parse. Checked on the syntax tree of every
module of the package, and of the scripts, so a new call cannot sneak in.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Calls that hand a string to /bin/sh (or run code from a string).
SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("pty", "spawn"),
    ("commands", "getoutput"),
}
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash", "dash"}


def python_sources() -> Iterator[Path]:
    yield from sorted((ROOT / "tcptrace").rglob("*.py"))
    for path in sorted((ROOT / "scripts").iterdir()):
        if path.is_file() and path.read_bytes()[:40].startswith(b"#!") and b"python" in (
            path.read_bytes().split(b"\n", 1)[0]
        ):
            yield path
    yield from sorted((ROOT / "benchmarks").glob("*.py"))


def _dotted(node: ast.expr) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"line {node.lineno}"
        if name[-2:] in SHELL_CALLS:
            found.append(f"{where}: {'.'.join(name)}()")
        if name in (("eval",), ("exec",)):
            found.append(f"{where}: {name[0]}()")
        for kw in node.keywords:
            if kw.arg == "shell" and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is False
            ):
                found.append(f"{where}: shell= is not False")
        # subprocess.run(["sh", "-c", ...]) is a shell by another name.
        if node.args and isinstance(node.args[0], ast.List) and node.args[0].elts:
            first = node.args[0].elts[0]
            if isinstance(first, ast.Constant) and first.value in SHELLS:
                found.append(f"{where}: runs {first.value}")
    return found


def test_no_module_spawns_a_shell() -> None:
    sources = list(python_sources())
    assert len(sources) > 20  # the scan really covers the package
    problems = {
        str(path.relative_to(ROOT)): bad
        for path in sources
        if (bad := violations(ast.parse(path.read_text(), filename=str(path))))
    }
    assert problems == {}


def test_the_check_catches_each_form() -> None:
    # The detector itself, on the forms it must refuse (and one it must allow).
    bad = """
import os, subprocess
os.system("ls " + name)
os.popen(cmd)
subprocess.run(cmd, shell=True)
subprocess.Popen(cmd, shell=flag)
subprocess.getoutput(cmd)
subprocess.run(["sh", "-c", cmd])
eval(text)
"""
    assert len(violations(ast.parse(bad))) == 7
    good = 'import subprocess\nsubprocess.run(["addr2line", "-e", path], shell=False)\n'
    assert violations(ast.parse(good)) == []


def test_text_grep_agrees() -> None:
    # Belt and braces: the plain strings, wherever they appear in code lines.
    needles = ("shell=True", "os.system(", "os.popen(")
    hits = []
    for path in python_sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(n in code for n in needles):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []
