"""The OpenAI-compatible resources, a package each (``files``, ``batches``): routes, request models and
service functions; ``common`` holds OpenAI's error body and list page, which they share."""
