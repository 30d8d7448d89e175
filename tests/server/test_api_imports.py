"""Imports in api/ flow one way (no module imports one that imports it back, lazily or
not), and what `lmq generate` runs does not pull in Celery."""

import subprocess
import sys

from api_support import REPO
from import_support import assert_no_cycle, module_graph


def test_api_modules_import_each_other_without_a_cycle():
    graph = module_graph(sorted((REPO / "api").rglob("*.py")))
    assert {"lmq.api.cli", "lmq.api.cli.remote", "lmq.api.cli.jobs", "lmq.api.app.main", "lmq.api.app.routes.jobs"} <= set(graph)
    assert "lmq.api.cli.jobs" in graph["lmq.api.cli.remote"]  # the graph sees imports
    assert_no_cycle(graph)


def test_running_a_job_here_does_not_import_celery():
    code = (
        "import sys; import lmq.api.cli, lmq.workers.runner; "
        "assert 'celery' not in sys.modules and 'kombu' not in sys.modules, 'celery imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
