"""lmq's front doors, a package each: ``server`` (the HTTP API: ``lmq.api.server.app``) and ``cli``
(the ``lmq`` command, its Python client ``lmq.api.cli.client`` and its progress display)."""
