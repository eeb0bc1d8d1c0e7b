"""The layering of DESIGN.md §5 in the imports: an arrow only points down, and no module imports
itself back through another (a cycle). Function-level imports count too: they hide a cycle from
import time, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "overlayd"

# Higher number = higher layer. Top-level helper modules (errors, rate_limited_log, ...) are
# below every layer; the tools (lab, bench, demo, fuzz) sit above the cli's layer and may use
# anything.
RANK = {"wire": 1, "dataplane": 2, "io": 3, "control": 4, "ops": 5, "runtime": 6, "cli": 7,
        "__main__": 8}
TOOLS = {"lab", "bench", "demo", "fuzz"}   # built on everything; `overlayd demo` dispatches to one


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` depends on pkg.sub; `from pkg import name`, on pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0        # the package itself (its __version__)
    return RANK.get(parts[1], 0)


def is_tool(module: str) -> bool:
    return len(module.split(".")) > 1 and module.split(".")[1] in TOOLS


def test_every_import_points_down_or_sideways() -> None:
    upward = [(m, t) for m, targets in imports().items() for t in targets
              if not is_tool(m) and not is_tool(t) and layer(t) > layer(m)]
    assert upward == [], upward


def test_no_import_cycles() -> None:
    graph = imports()
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == path[0]:
                cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:   # each cycle once, from its least member
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == [], cycles
