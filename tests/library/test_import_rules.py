"""The package's import rules, read from the source (function-level imports count):
lmq.core imports none of lmq.plugins, lmq.workers or lmq.api; lmq.workers imports no
lmq.api; no module imports one that imports it back; the HTTP app starts without the
model library."""

import os
import subprocess
import sys

from import_support import ROOT, assert_no_cycle, imports_of, module_graph

FOLDERS = ("core", "plugins", "workers", "api")


def package_paths(*folders):
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def test_the_whole_package_imports_without_a_cycle():
    graph = module_graph(package_paths(*FOLDERS))
    assert {"lmq.core.models.causal_lm", "lmq.api.cli", "lmq.workers.runner", "lmq.plugins.llama"} <= set(graph)
    assert "lmq.core.models.generative_task" in graph["lmq.core.models.causal_lm"]  # the graph sees imports
    assert_no_cycle(graph)


def test_imports_flow_one_way():
    above = {"core": ("lmq.plugins", "lmq.workers", "lmq.api"), "plugins": ("lmq.workers", "lmq.api"),
             "workers": ("lmq.api",)}
    for folder, forbidden in above.items():
        for path in package_paths(folder):
            wrong = sorted(m for m in imports_of(path) if m.startswith(forbidden))
            assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_the_http_app_loads_neither_torch_nor_keras(tmp_path):
    code = (
        "import sys; from lmq.api.app.main import create_app; create_app(); "
        "heavy = sorted(m for m in ('torch', 'keras') if m in sys.modules); assert not heavy, heavy"
    )
    environment = {**os.environ, "LMQ_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=environment)
    assert done.returncode == 0, done.stderr
