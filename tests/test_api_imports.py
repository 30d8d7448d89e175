"""Imports in api/ flow one way (no module imports one that imports it back, lazily or
not), and what `lmq generate` runs does not pull in Celery."""

import ast
import subprocess
import sys

from api_support import REPO


def api_imports() -> dict[str, set[str]]:
    """module -> the api modules it imports anywhere in its body (function-level imports too)."""
    graph = {}
    for path in sorted((REPO / "api").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = imported
    return {module: {name for name in imported if name in graph and name != module} for module, imported in graph.items()}


def test_api_modules_import_each_other_without_a_cycle():
    graph = api_imports()
    assert {"api.cli", "api.cli_remote", "api.cli_jobs", "api.app", "api.routes.jobs"} <= set(graph)

    def visit(module, path):
        assert module not in path, "import cycle: " + " -> ".join([*path, module])
        for imported in graph[module]:
            visit(imported, [*path, module])

    for module in graph:
        visit(module, [])


def test_running_a_job_here_does_not_import_celery():
    code = (
        "import sys; import api.cli, workers.runner; "
        "assert 'celery' not in sys.modules and 'kombu' not in sys.modules, 'celery imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
