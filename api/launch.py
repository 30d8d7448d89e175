"""The ``lmq`` command's entry point, before anything heavy is imported: it starts the command in a
process with lmq's memory allocator (``lmq.core.config.allocator_environment``)."""

import os
import sys

from lmq.core.config import allocator_environment


def run() -> int:
    """``lmq.api.cli.main`` in a process with lmq's memory allocator: one started without it starts
    again with it first, as ``python -m lmq.api.cli``, which runs the command as it is."""
    preload = allocator_environment()
    if preload and sys.executable:
        os.execve(sys.executable, [sys.executable, "-m", "lmq.api.cli", *sys.argv[1:]], {**os.environ, **preload})
    from lmq.api.cli import main

    return main()
