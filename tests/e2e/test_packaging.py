"""`pip install .` adds one package, `lmq`, and nothing named core, api, workers or plugins."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_plain_install_adds_only_the_lmq_package(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "__pycache__", "*.egg-info"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True,
    )
    installed = sorted(path.name for path in site.iterdir())
    assert [name for name in installed if not name.endswith(".dist-info")] == ["bin", "lmq"], installed
    assert [path.name for path in (site / "bin").iterdir()] == ["lmq"]
    assert sorted(path.name for path in (site / "lmq").iterdir() if path.is_dir() and path.name != "__pycache__") == [
        "api", "core", "plugins", "workers",
    ]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}  # the dependencies come from this environment

    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=environment, capture_output=True, text=True)

    loaded = run("import lmq.core.models, lmq.api.cli, lmq.testing; print(lmq.core.models.__file__)")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(str(site / "lmq" / "core")), loaded.stdout
    for name in ("core", "api", "workers", "plugins"):
        assert "ModuleNotFoundError" in run(f"import {name}").stderr, name
    helped = subprocess.run([site / "bin" / "lmq", "--help"], cwd=elsewhere, env=environment, capture_output=True, text=True)
    assert helped.returncode == 0 and "generate" in helped.stdout, helped.stderr
