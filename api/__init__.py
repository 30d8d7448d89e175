"""lmq's front doors: the `lmq` command line (and, next, the HTTP API and a client)."""
