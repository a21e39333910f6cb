#!/usr/bin/env bash
# Lists the `crate::<module>` edges between the top-level modules of src/ (and the submodules
# of src/exec/), then exits non-zero naming a cycle if the graph has one.
#
# A node is a top-level module (`cluster`, `report`, ...; a folder module and all its files
# count as one node) or an `exec::<sub>` module. Every `crate::a::b` path in a file counts,
# in `use` lines and inline alike, tests included: a test-only import is still an arrow.
# Usage: scripts/import-graph.sh [SRC_DIR]   (default: src/ next to this script)
set -euo pipefail
src="${1:-$(dirname "$0")/../src}"
exec python3 - "$src" <<'PY'
import os, re, sys

src = os.path.normpath(sys.argv[1])

def node_of(rel):
    """The node a file belongs to: src/exec/dispatch.rs -> exec::dispatch, src/cluster/check.rs -> cluster."""
    parts = rel[:-3].split(os.sep)  # strip .rs
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return None  # crate roots: they declare modules, they are not one
    if parts[0] == "exec" and len(parts) >= 2:
        return "exec::" + parts[1]
    return parts[0]

def target_of(path):
    """The node a `crate::...` path points at."""
    segs = path.split("::")
    if segs[0] == "exec" and len(segs) >= 2 and re.fullmatch(r"[a-z_][a-z0-9_]*", segs[1]):
        return "exec::" + segs[1]
    return segs[0]

edges = {}
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith(".rs"):
            continue
        full = os.path.join(root, f)
        node = node_of(os.path.relpath(full, src))
        if node is None:
            continue
        text = open(full, encoding="utf-8").read()
        # Drop line comments so doc text mentioning `crate::x` draws no arrow.
        text = "\n".join(l.split("//", 1)[0] for l in text.splitlines())
        for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)?)", text):
            t = target_of(m.group(1))
            if t != node and not (node.startswith(t + "::")):
                edges.setdefault(node, set()).add(t)
        # `use crate::{a, b::c}` groups.
        for m in re.finditer(r"\bcrate::\{([^}]*)\}", text):
            for item in m.group(1).split(","):
                item = item.strip()
                if item:
                    t = target_of(item)
                    if t != node and not node.startswith(t + "::"):
                        edges.setdefault(node, set()).add(t)

for a in sorted(edges):
    for b in sorted(edges[a]):
        print(f"{a} -> {b}")

# Every elementary cycle would be overkill; report each strongly connected component with a
# cycle, and one concrete cycle through it.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
nodes = sorted(set(edges) | {b for bs in edges.values() for b in bs})

def strongconnect(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in sorted(edges.get(v, ())):
        if w not in index:
            strongconnect(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))

sys.setrecursionlimit(10000)
for v in nodes:
    if v not in index:
        strongconnect(v)

def a_cycle(comp):
    members = set(comp)
    start = comp[0]
    # BFS from start back to start inside the component.
    prev, frontier, seen = {}, [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in seen:
                    seen.add(w); prev[w] = v; nxt.append(w)
        frontier = nxt
    return comp

if sccs:
    for comp in sccs:
        print("cycle: " + " -> ".join(a_cycle(comp)) + f"   (modules in the cycle: {', '.join(comp)})", file=sys.stderr)
    sys.exit(1)
print(f"no cycles ({len(nodes)} modules, {sum(len(b) for b in edges.values())} edges)")
PY
