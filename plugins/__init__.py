"""Built-in architectures, each a pluggy plugin registered through the ``lmq.plugins`` entry point."""
