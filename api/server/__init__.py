"""The HTTP server: the app, its routes by resource, the OpenAI-compatible resources, auth and dispatch."""
