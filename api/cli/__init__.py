"""The ``lmq`` command: its commands (``commands``), those written once over SQL or HTTP (``jobs``; the
store in ``commands``, a server in ``remote``), the Python client (``client``) and the progress display (``progress``)."""

from lmq.api.cli.commands import main

__all__ = ["main"]
