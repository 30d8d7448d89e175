"""``python -m lmq.api.cli``: the ``lmq`` command."""

from lmq.api.cli import main

raise SystemExit(main())
