"""/v1/batches: a batch file's lines (``lines``), a batch as one lmq job (``service``), the routes (``routes``)."""
