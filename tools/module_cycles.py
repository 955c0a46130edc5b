#!/usr/bin/env python3
"""Lists import cycles between the modules of each crate, and the crate graph's cycles.

A module depends on another when its file names it through `crate::a::b` (in a `use` or a
path) or `super::x` from a sibling; a parent declaring a child (`mod x;`) and the crate root's
re-exports are not dependencies. Test modules (`#[cfg(test)]` and below) are ignored. Prints
every cycle found and exits 1 if there is one:

    python3 tools/module_cycles.py
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "crates"


def module_of(src: pathlib.Path, file: pathlib.Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def code(file: pathlib.Path) -> str:
    text = file.read_text()
    cut = text.find("#[cfg(test)]")
    text = text if cut < 0 else text[:cut]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def paths(text: str, root: str) -> list:
    """Every path `root::a::b` in the text, brace groups (`root::{a, b::{c}}`) expanded."""
    out = []
    for m in re.finditer(r"\b" + root + r"((?:::\w+)*)(::\{)?", text):
        prefix = tuple(p for p in m.group(1).split("::") if p)
        if not m.group(2):
            out.append(prefix)
            continue
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner = text[m.end(): i - 1]
        for item in re.findall(r"\w+(?:::\w+)*", re.sub(r"\{[^{}]*\}", "", inner)):
            out.append(prefix + tuple(item.split("::")))
    return out


def deps(mod: tuple, text: str, modules: set) -> set:
    found = set()
    for path in paths(text, "crate"):
        # the longest prefix that is a module
        for n in range(len(path), 0, -1):
            if path[:n] in modules:
                found.add(path[:n])
                break
    for rel in paths(text, "super"):
        path = mod[:-1] + rel
        for n in range(len(path), len(mod[:-1]), -1):
            if path[:n] in modules:
                found.add(path[:n])
                break
    # A module's own children and ancestors are structure, not dependencies.
    return {d for d in found if d != mod and d[: len(mod)] != mod and mod[: len(d)] != d}


def cycles(graph: dict) -> list:
    out, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                out.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return out


found = []
for crate in sorted(p for p in ROOT.iterdir() if (p / "src").is_dir()):
    src = crate / "src"
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f) for f in files}
    graph = {module_of(src, f): deps(module_of(src, f), code(f), modules) for f in files}
    for c in cycles(graph):
        found.append(f"{crate.name}: " + " -> ".join("::".join(m) or "crate" for m in c))
    print(f"{crate.name}: {len(files)} modules, {sum(len(v) for v in graph.values())} module dependencies")
for line in found:
    print("cycle:", line)
print(f"{len(found)} cycles")
sys.exit(1 if found else 0)
