"""The import graph of tasa's packages, from the source (no import is executed).

    python tools/import_graph.py            # Mermaid graph (paste into docs/ARCHITECTURE.md)
    python tools/import_graph.py --check    # exit 1 on a cycle or a forbidden import, naming it

Nodes are the first component under ``tasa`` (a subpackage such as ``quant``, or a top-level module such as
``plan``); an edge A -> B means some file of A imports from B, at module level or inside a function.  The
rules (issue 35) are in :data:`FORBIDDEN`; tests/unit/test_architecture.py runs the same checks.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tasa"

# (files whose path under src/tasa starts with this, packages they must not import, why)
FORBIDDEN = [
    ("quant/rtn.py", {"models", "data", "eval", "profile", "mixture"}, "quantization kernels are pure functions"),
    ("quant/gptq.py", {"models", "data", "eval", "profile", "mixture"}, "quantization kernels are pure functions"),
    ("eval/", {"quant", "allocate", "profile", "mixture"}, "evaluation scores any model"),
    ("allocate/", {"models", "data", "eval", "profile", "mixture", "quant", "export"},
     "allocation is torch-free arithmetic on cost tables"),
    ("distributed/", {"pipeline"}, "placement runs a stage's work, it does not drive stages"),
]


def node_of(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def file_imports(path: Path) -> set[str]:
    """The tasa nodes a file imports from."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        names = ([n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else
                 [a.name for a in n.names] if isinstance(n, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "tasa":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


def graph(src: Path = SRC) -> dict[str, dict[str, list[str]]]:
    """{node: {imported node: [files making the import]}}, without self-edges."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src)
        edges[node_of(rel)]  # every node, also those importing nothing
        for target in file_imports(f):
            if target != node_of(rel):
                edges[node_of(rel)][target].append(str(rel))
    return {k: dict(v) for k, v in edges.items()}


def cycles(g: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (each reported once, from its smallest node)."""
    found = set()
    out = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in g.get(node, {}):
            if nxt == start:
                cyc = path[:]
                if tuple(sorted(cyc)) not in found:
                    found.add(tuple(sorted(cyc)))
                    out.append(cyc + [start])
            elif nxt not in path and nxt > start:
                visit(start, nxt, path + [nxt])

    for start in sorted(g):
        visit(start, start, [start])
    return out


def violations(src: Path = SRC) -> list[str]:
    """Forbidden imports (see FORBIDDEN) and imports of the CLI from anywhere but ``__main__``."""
    out = []
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src)
        imported = file_imports(f)
        for prefix, banned, why in FORBIDDEN:
            if str(rel).startswith(prefix) and imported & banned:
                out.append(f"{rel} imports {', '.join(sorted(imported & banned))} ({why})")
        if "cli" in imported and node_of(rel) not in ("cli", "__main__"):
            out.append(f"{rel} imports cli (nothing but __main__ may)")
        if "distributed" in imported and node_of(rel) not in ("pipeline", "distributed"):
            out.append(f"{rel} imports distributed (only the stages choose where their work runs)")
    return out


def mermaid(g: dict[str, dict[str, list[str]]]) -> str:
    core = {"errors", "artifacts", "__init__", "__main__"}  # imported by nearly everything: left out of the drawing
    lines = ["graph TD"]
    for node in sorted(g):
        for target in sorted(g[node]):
            if node not in core and target not in core:
                lines.append(f"    {node} --> {target}")
    return "\n".join(lines)


def main() -> int:
    g = graph()
    if sys.argv[1:] == ["--check"]:
        problems = [f"cycle: {' -> '.join(c)}" for c in cycles(g)] + violations()
        for p in problems:
            print(p)
        print(f"{len(g)} nodes, {sum(len(v) for v in g.values())} edges, {len(problems)} problems")
        return 1 if problems else 0
    print(mermaid(g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
