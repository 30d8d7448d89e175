"""The HTTP API, laid out as FastAPI's larger applications are: ``main`` (create_app), ``routes/`` by
resource, ``openai/`` (the OpenAI-compatible resources), ``dependencies``, ``auth``, ``dispatch``
(broker or in-process worker), ``utf8_bodies`` and ``serving`` (uvicorn's limits).

Importing this package imports none of them, so the CLI can read ``auth`` without loading the app."""
