"""/v1/files: uploads parsed as they stream (``upload``), and the routes (``routes``)."""
