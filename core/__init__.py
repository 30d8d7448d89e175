"""lmq's shared core: model library, presets, plugin registry, SQL store, settings.

The model library runs on Keras 3 with the PyTorch backend. The backend must be
chosen before keras is first imported, so it is set here; ``lmq.core.store`` and
``lmq.core.config`` never import keras, which keeps the API process light.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
