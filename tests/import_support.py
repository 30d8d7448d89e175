"""What the import-rule tests share: the modules a file imports, and the cycles among modules."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imports_of(path) -> set[str]:
    """The modules a file imports anywhere in its body (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_graph(paths) -> dict[str, set[str]]:
    """module -> the modules among `paths` that it imports."""
    modules = {"lmq." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    return {module: imports_of(path) & modules.keys() - {module} for module, path in modules.items()}


def assert_no_cycle(graph: dict[str, set[str]]) -> None:
    """Lazy imports count: a function-level import that closes a loop is still a cycle."""
    done: set[str] = set()

    def visit(module, path):
        assert module not in path, "import cycle: " + " -> ".join([*path, module])
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
