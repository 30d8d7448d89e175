"""``model.weights.h5`` in KerasHub's layout, read and written with h5py (no pickle).

Each backbone lists ``{h5 path: variable}`` (``Backbone.keras_hub_weights``); the
file must hold exactly those datasets with the configured shapes.
"""

import h5py
import keras
import ml_dtypes
import numpy as np

WEIGHTS_FILE = "model.weights.h5"


def _datasets(h5_file):
    found = {}

    def visit(name, obj):  # returning anything but None would stop the walk
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    h5_file.visititems(visit)
    return found


def _read(dataset):
    if dataset.attrs.get("dtype") == "bfloat16":  # how Keras stores bfloat16
        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    return dataset[()]


def read_weights(backbone, path):
    expected = backbone.keras_hub_weights()
    if not path.is_file():
        raise FileNotFoundError(f"Preset weights file not found: {path}")
    with h5py.File(path, "r") as h5_file:
        found = _datasets(h5_file)
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match {type(backbone).__name__}'s config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )
        for name, variable in expected.items():
            data = found[name]
            if tuple(data.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{path}: weight {name!r} has shape {tuple(data.shape)}, but the config "
                    f"needs {tuple(variable.shape)}."
                )
            variable.assign(_read(data))


def write_weights(backbone, path):
    with h5py.File(path, "w") as h5_file:
        for name, value in backbone.weights_to_save().items():
            value = keras.ops.convert_to_numpy(value)
            dataset = h5_file.create_dataset(name, data=value)
            if value.dtype == ml_dtypes.bfloat16:
                dataset.attrs["dtype"] = "bfloat16"
