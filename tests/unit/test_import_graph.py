"""The import rules of docs/STYLE.md, read from the import graph (grimp, import-linter's graph builder).

- Arrows point down only: student_worker -> teacher_service -> common (the import-linter contract in
  pyproject.toml, which `scripts/test.sh` also runs as `lint-imports`).
- No circle between modules: every strongly connected component of the module graph is one module.
Both see imports inside functions too, not just those at the top of a file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

PACKAGES = ("common", "teacher_service", "student_worker")
ROOT = Path(__file__).resolve().parents[2]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_circle_between_modules():
    graph = grimp.build_graph(*PACKAGES)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in graph.modules} for m in graph.modules}
    assert circles(edges) == []


def test_the_circle_finder_finds_circles():
    """The check can fail: a three-module circle and a self-contained pair are both reported."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(circles(edges)) == [["a", "b", "c"], ["d", "e"]]


def test_layers_contract_is_kept():
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout
