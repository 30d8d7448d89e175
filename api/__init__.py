"""lmq's front doors: the `lmq` command line, the HTTP API (`lmq.api.app`) and its Python client (`lmq.api.client`)."""
