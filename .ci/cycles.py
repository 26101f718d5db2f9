#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

Reads every `crate::` and `super::` path in `<src>/**/*.rs` (use lines, brace groups and
inline paths), maps each to the module file it lands in, and looks for strongly connected
components of more than one module. A module holds its children (an edge parent -> child),
so `a` using `b` while anything under `b` uses `a` is a circle; a child naming its own
ancestors is ordinary Rust scoping and not counted. Usage: cycles.py SRC_DIR [SRC_DIR ...]
"""
import os
import re
import sys


def modules(src):
    """Module path (tuple) -> file, for every .rs file under src."""
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            out[tuple(rel)] = os.path.join(root, f)
    return out


def expand(path):
    """`a::{b, c::{d}}` -> [`a::b`, `a::c::d`]."""
    path = re.sub(r"\s+", "", path)
    depth, start = 0, None
    for i, ch in enumerate(path):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                head, inner = path[:start], path[start + 1 : i]
                parts, d, last = [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        d += 1
                    elif c == "}":
                        d -= 1
                    elif c == "," and d == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                return [x for p in parts if p for x in expand(head + p)]
    return [path]


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(l.split("//")[0] if not l.strip().startswith("//") else "" for l in text.splitlines())


def scopes(text):
    """For each offset of `text`, the inline modules (`mod tests { .. }`) it sits in."""
    out, stack, depth = [], [], 0
    opens = {m.end() - 1: m.group(1) for m in re.finditer(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{", text)}
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if i in opens:
                stack.append((opens[i], depth))
        elif ch == "}":
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1
        out.append(tuple(n for n, _ in stack))
    return out


def references(module, text):
    """The paths (tuples of segments, from the crate root) this module's text names."""
    text = strip_comments(text)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(\\.|[^\\'])'", "' '", text)
    inner = scopes(text)
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found.extend((p, m.start()) for p in expand(m.group(1)))
    for m in re.finditer(r"\b(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+", text):
        found.append((m.group(0), m.start()))
    out = []
    for p, at in found:
        segs = [s.split(" as ")[0] for s in p.split("::")]
        if segs[0] == "crate":
            out.append(tuple(segs[1:]))
        elif segs[0] == "super":
            # `super` inside `mod tests { .. }` of a file is the file's module.
            base = list(module) + list(inner[at])
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            out.append(tuple(base + segs))
    return out


def graph(src):
    mods = modules(src)
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for ref in references(m, open(f).read()):
            # The longest module prefix of the path is where it lands.
            for n in range(len(ref), 0, -1):
                target = ref[:n]
                if target in mods:
                    # A child may use its ancestors' items (Rust's scoping); the parent
                    # holds the child, so that edge is below.
                    if target != m and target != m[: len(target)]:
                        edges[m].add(target)
                    break
        # A module holds its children: whoever uses it may reach them.
        parent = m[:-1]
        if m and parent in mods:
            edges[parent].add(m)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def name(m):
    return "::".join(m) or "crate"


def self_test():
    """Plants a circle (a -> b -> c -> a, through a child module) and a clean tree; the
    checker must find exactly the first."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "b"))
        files = {
            "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
            "a.rs": "use crate::b::inner::Thing;\n",
            "b.rs": "pub mod inner;\n",
            "b/inner.rs": "pub struct Thing;\nfn f() { crate::c::g(); }\n",
            "c.rs": "pub fn g() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::a::X;\n}\n",
        }
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        found = cycles(graph(d))
        assert found == [[("a",), ("b", "inner"), ("c",)]], found
        with open(os.path.join(d, "c.rs"), "w") as f:
            f.write("pub fn g() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n")
        assert cycles(graph(d)) == [], cycles(graph(d))
    print("cycles.py self-test: a planted circle is found, its removal clears it")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    bad = False
    for src in sys.argv[1:]:
        edges = graph(src)
        for comp in cycles(edges):
            bad = True
            members = set(comp)
            print(f"{src}: {len(comp)} modules import each other in a circle:")
            for m in comp:
                inside = sorted(name(t) for t in edges[m] if t in members)
                print(f"  {name(m)} -> {', '.join(inside)}")
    if bad:
        print("Break the circle: move the shared type below both users, or pass a narrow handle in.")
        sys.exit(1)
    print(f"no import cycles in {', '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
