#!/usr/bin/env python3
"""The module layering check (docs/architecture.md, "Layers").

Reads every `crate::...` path in the code (comments and doc comments
skipped) of each top-level module of `src/`, resolves names the crate root
re-exports to the module they come from, and fails when:

- `vm` (the core) uses any module but the `ErrorKind` vocabulary, the
  `sys` layer (and the ABI crate): features plug into the core, it never
  names them;
- `store` uses any module but `error_kind` and `sys`; `error_kind` or
  `sys` (the bottom layers) use any module at all;
- the graph of top-level modules has a cycle.

Prints the graph it found. Run from the repository root.
"""

import re
import sys
from pathlib import Path

SRC = Path("src")
# What each module may use, where a rule applies (None: no rule).
ALLOWED = {
    "vm": {"error_kind", "sys"},
    "store": {"error_kind", "sys"},
    "error_kind": set(),
    "sys": set(),
}


def strip_comments(text):
    """The code of a Rust file without comments or string contents."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path):
    rel = path.relative_to(SRC)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return rel.stem  # lib, error, error_kind, instance, ...


def root_reexports(lib):
    """Name -> module for the crate root's `pub use module::{...}` lines."""
    names = {}
    code = strip_comments(lib.read_text())
    for m in re.finditer(r"pub use (\w+)::\{([^}]*)\}", code):
        for name in re.split(r"[\s,]+", m.group(2)):
            if name:
                names[name] = m.group(1)
    for m in re.finditer(r"pub use (\w+)::(\w+);", code):
        names[m.group(2)] = m.group(1)
    for m in re.finditer(r"pub use (\w+) as (\w+);", code):
        names[m.group(2)] = m.group(2)
    return names


def main():
    modules = {module_of(p) for p in SRC.rglob("*.rs")} - {"lib"}
    reexports = root_reexports(SRC / "lib.rs")
    graph = {m: set() for m in modules}
    where = {}
    for path in sorted(SRC.rglob("*.rs")):
        source = module_of(path)
        if source == "lib":
            continue
        code = strip_comments(path.read_text())
        for m in re.finditer(r"\bcrate::(\w+)", code):
            name = m.group(1)
            target = name if name in modules else reexports.get(name)
            if target is None:
                print(f"layering: {path}: cannot resolve crate::{name}")
                return 1
            if target not in modules:
                continue  # a crate re-exported at the root (the ABI)
            if target != source:
                graph[source].add(target)
                where.setdefault((source, target), str(path))
        # `super::` from a file directly under src/ is the crate root.
        if path.parent == SRC:
            for m in re.finditer(r"\bsuper::(\w+)", code):
                target = m.group(1)
                target = target if target in modules else reexports.get(target, target)
                if target in modules and target != source:
                    graph[source].add(target)
                    where.setdefault((source, target), str(path))

    for source in sorted(graph):
        print(f"  {source} -> {', '.join(sorted(graph[source])) or '(nothing)'}")

    failed = False
    for source, allowed in ALLOWED.items():
        for target in sorted(graph.get(source, set()) - allowed):
            print(f"layering: {source} must not use {target} ({where[(source, target)]})")
            failed = True

    # Cycles: depth-first search for a back edge.
    state = {}

    def visit(node, stack):
        nonlocal failed
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                print(f"layering: module cycle {' -> '.join(cycle)}")
                failed = True
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])

    if failed:
        return 1
    print("layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
