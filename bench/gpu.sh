#!/usr/bin/env bash
# lmq vs transformers on one NVIDIA GPU (bench/gpu.py), for a machine whose Python has torch
# and transformers but not keras, and no network: what lmq needs beyond those comes as wheels.
#
#   bench/gpu.sh --prepare        # here, with network: wheels into bench/gpu-wheels/ (gitignored)
#   bench/gpu.sh                  # there, in a copy of the checkout that carries bench/gpu-wheels/
#   bench/gpu.sh --shape 1b       # options go to bench/gpu.py (--batches, --new-tokens, --peak-tbps, ...)
#   PYTHON=.venv/bin/python bench/gpu.sh --smoke   # the whole path on a CPU, tiny shape
#
# --prepare downloads keras, pluggy, sentencepiece, jinja2, llguidance and pydantic (the versions this checkout's
# environment has) with their dependencies, as binary wheels for CPython 3.11..3.13 on x86-64
# Linux (PY_VERSIONS to change), leaving out numpy (the GPU machine's torch and transformers
# bring theirs; a second one would shadow it). About 30 MB.
#
# A run installs, with pip --no-index --no-deps, only the wheels whose distribution the
# machine's Python lacks, into a temporary directory; puts the checkout's lmq there too
# (links to core/, plugins/, workers/, api/ and a dist-info with pyproject.toml's plugin
# entry points, so no build is needed); then runs bench/gpu.py with that directory first
# on PYTHONPATH. Nothing is installed into the machine's Python.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
wheels=${LMQ_GPU_WHEELS:-$here/gpu-wheels}
python=${PYTHON:-python3}

if [ "${1:-}" = --prepare ]; then
    pins=$("$python" -c "
import importlib.metadata as m
print(' '.join(f'{d}=={m.version(d)}' for d in ('keras', 'pluggy', 'sentencepiece', 'jinja2', 'llguidance', 'pydantic')))")
    mkdir -p "$wheels"
    for version in ${PY_VERSIONS:-3.11 3.12 3.13}; do
        "$python" -m pip download --quiet --only-binary=:all: --python-version "$version" \
            --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$wheels" $pins
    done
    rm -f "$wheels"/numpy-*.whl
    echo "wheels for: $pins (and their dependencies) in $wheels: $(du -sh "$wheels" | cut -f1)"
    exit 0
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/lmq-gpu-site-XXXXXX")
trap 'rm -rf "$site"' EXIT

missing=$("$python" - "$wheels" <<'EOF'
import importlib.metadata, pathlib, sys

names = {path.name.split("-")[0] for path in pathlib.Path(sys.argv[1]).glob("*.whl")}
for name in sorted(names):
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(name)
EOF
)
if [ -n "$missing" ]; then
    echo "installing from $wheels into $site: $(echo $missing)"
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" --target "$site" $missing
fi

"$python" - "$repo" "$site" <<'EOF'
"""The checkout as the package lmq (links), with the entry points its plugins register through."""
import pathlib, sys, tomllib

repo, site = map(pathlib.Path, sys.argv[1:])
project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
package = site / "lmq"
package.mkdir()
for entry in (repo / "lmq").iterdir():
    (package / entry.name).symlink_to(entry)
for folder in ("core", "plugins", "workers", "api"):
    (package / folder).symlink_to(repo / folder)
info = site / f"lmq-{project['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lmq\nVersion: {project['version']}\n")
groups = project.get("entry-points", {})
(info / "entry_points.txt").write_text(
    "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) for group, points in groups.items())
)
EOF

PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/gpu.py" "$@"
