"""lmq's front doors, a package each: ``app`` (the HTTP API; ``lmq.api.app.main.create_app`` builds it)
and ``cli`` (the ``lmq`` command, its Python client ``lmq.api.cli.client`` and its progress display)."""
