"""lmq: batch generation and queued fine-tuning for open language models.

The package is the repository's four top-level folders, installed under one name
(setup.py maps them):

- ``lmq.core``: the model library (KerasHub's task API on Keras 3 + PyTorch), presets,
  samplers, the plugin registry and the SQL store;
- ``lmq.plugins``: the built-in architectures, and the plugin API third parties import;
- ``lmq.workers``: the workers that run generate and fit jobs;
- ``lmq.api``: the HTTP server and the ``lmq`` command line.

``lmq.testing`` is the conformance kit a plugin's tests subclass.
"""
