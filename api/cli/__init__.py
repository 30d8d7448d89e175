"""The ``lmq`` command: local commands (``commands``), jobs through SQL or over HTTP (``jobs``, ``remote``),
the Python client (``client``) and the progress display (``progress``)."""

from lmq.api.cli.commands import main

__all__ = ["main"]
