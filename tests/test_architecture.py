"""The package's structure: no import cycles, the layers of docs/architecture.md, module sizes.

The layer contracts themselves are checked by ``lint-imports`` (``make test`` runs it; the
contracts are in ``pyproject.toml``). These tests check what import-linter does not: that no
two modules of ``ctflow`` or ``benchmarks`` import each other through any chain (imports inside
functions count), and that the documented layers and the contracts agree.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

REPO = Path(__file__).resolve().parents[1]
#: Modules longer than this must say why in their docstring ("longer than 400 lines because").
MAX_LINES = 420


def _graph():
    if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
        sys.path.insert(0, str(REPO))
    return grimp.build_graph("ctflow", "benchmarks", cache_dir=None)


def strongly_connected(nodes, edges):
    """Tarjan's strongly connected components of a directed graph (iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    out.append(sorted(comp))
                continue
            if nxt not in index:
                index[nxt] = low[nxt] = counter
                counter += 1
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(edges.get(nxt, ()))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return out


def test_strongly_connected_finds_a_cycle_and_nothing_else():
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": []}
    comps = strongly_connected(["a", "b", "c", "d", "e"], edges)
    assert [c for c in comps if len(c) > 1] == [["a", "b", "c"]]


def test_no_import_cycles_between_modules():
    g = _graph()
    nodes = sorted(g.modules)
    edges = {m: sorted(g.find_modules_directly_imported_by(m)) for m in nodes}
    cycles = [c for c in strongly_connected(nodes, edges) if len(c) > 1]
    assert not cycles, "import cycles (each line one strongly connected set of modules):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in cycles)


def _contract_layers():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in cfg["contracts"] if c["type"] == "layers"]
    return [sorted(p.strip() for p in layer.split("|")) for layer in layers]


def test_architecture_doc_matches_the_contracts():
    """docs/architecture.md lists the same layers, top to bottom, as the layers contract."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    doc = [sorted(re.findall(r"ctflow\.\w+", line)) for line in block.splitlines()
           if re.search(r"ctflow\.\w+", line)]
    assert doc == _contract_layers()


def test_every_package_is_in_a_layer():
    layered = {m for layer in _contract_layers() for m in layer}
    packages = {f"ctflow.{p.name}" for p in (REPO / "ctflow").iterdir()
                if (p / "__init__.py").is_file()}
    modules = {f"ctflow.{p.stem}" for p in (REPO / "ctflow").glob("*.py")
               if not p.name.startswith("_")}
    assert packages | modules <= layered, sorted((packages | modules) - layered)


def test_modules_are_short_or_say_why():
    long = []
    for root in ("ctflow", "benchmarks"):
        for p in sorted((REPO / root).rglob("*.py")):
            n = len(p.read_text().splitlines())
            if n > MAX_LINES and "longer than 400 lines because" not in p.read_text()[:4000]:
                long.append(f"{p.relative_to(REPO)}: {n} lines")
    assert not long, "modules over ~400 lines without a reason in their docstring:\n" + \
        "\n".join(long)
