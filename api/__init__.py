"""lmq's front doors: the `lmq` command line, the HTTP API (`api.app`) and its Python client (`api.client`)."""
