"""``model.weights.h5`` in KerasHub's layout, read and written with h5py (no pickle).

Each backbone lists ``{h5 path: variable}`` (``Backbone.keras_hub_weights``); the
file must hold exactly those datasets with the configured shapes and a dtype that fits.
Nothing in it may reach another file: soft and external links, external storage,
virtual datasets and filters HDF5 would load as plugins are refused.
"""

import h5py
import keras
import ml_dtypes
import numpy as np

WEIGHTS_FILE = "model.weights.h5"
# The filters HDF5 has built in; for any other it would load a plugin library from its plugin path.
BUILT_IN_FILTERS = {
    h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32, h5py.h5z.FILTER_SZIP,
    h5py.h5z.FILTER_NBIT, h5py.h5z.FILTER_SCALEOFFSET, h5py.h5z.FILTER_LZF,
}


def _datasets(h5_file, refuse):
    """{path: dataset} of every dataset, reached by hard links only; ``refuse(problem)`` raises."""
    links = []
    h5_file.visititems_links(lambda name, link: links.append((name, link)))  # (raising inside is h5py's SystemError)
    found = {}
    for name, link in links:
        if not isinstance(link, h5py.HardLink):
            refuse(f"{name!r} is a {type(link).__name__}; only plain datasets are read")
        item = h5_file[name]
        if isinstance(item, h5py.Dataset):
            if item.external or item.is_virtual:
                refuse(f"dataset {name!r} keeps its data in other files; refused")
            plist = item.id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            if filters - BUILT_IN_FILTERS:
                refuse(f"dataset {name!r} needs HDF5 filter {sorted(filters - BUILT_IN_FILTERS)}, a plugin; refused")
            found[name] = item
    return found


def _stored_dtype(dataset):
    if dataset.attrs.get("dtype") == "bfloat16":  # how Keras stores bfloat16: 2-byte opaque values
        return "bfloat16" if dataset.dtype.itemsize == 2 and dataset.dtype.kind == "V" else None
    try:
        return keras.backend.standardize_dtype(dataset.dtype)
    except ValueError:  # strings, compounds, opaque data
        return None


def dtype_fits(stored, variable_dtype):
    """Whether data of ``stored`` dtype may fill a variable of ``variable_dtype``: any float into
    a float (a preset loads at another precision), else only the same dtype (int8 into int8)."""
    variable_dtype = keras.backend.standardize_dtype(variable_dtype)
    if stored is None:
        return False
    both_float = keras.backend.is_float_dtype(stored) and keras.backend.is_float_dtype(variable_dtype)
    return stored == variable_dtype or both_float


def _read(dataset, stored):
    if stored == "bfloat16":
        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    return dataset[()]


def read_weights(backbone, files, relative=WEIGHTS_FILE):
    """Fills ``backbone`` from the preset's ``relative`` file (``PresetFiles``, see core.presets.files)."""
    expected = backbone.keras_hub_weights()
    path = files.file(relative)

    def refuse(problem):
        raise files.error(relative, problem)

    try:
        h5_file = h5py.File(path, "r")
    except OSError:
        refuse("is not a readable HDF5 file")
    with h5_file:
        found = _datasets(h5_file, refuse)
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        if missing or unexpected:
            int8 = [name for name, data in found.items() if _stored_dtype(data) == "int8"]
            hint = ""
            if int8 and backbone.quantization_mode is None:
                hint = f" It holds int8 weights ({int8[0]!r}...), but config.json's dtype is not int8."
            refuse(
                f"does not match {type(backbone).__name__}'s config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.{hint}"
            )
        for name, variable in expected.items():
            data = found[name]
            if tuple(data.shape) != tuple(variable.shape):
                refuse(f"weight {name!r} has shape {tuple(data.shape)}, but the config needs {tuple(variable.shape)}.")
            stored = _stored_dtype(data)
            if not dtype_fits(stored, variable.dtype):
                refuse(f"weight {name!r} holds {stored or 'non-numeric'} data, but the layer is {variable.dtype}.")
            variable.assign(_read(data, stored))


def write_weights(backbone, path):
    with h5py.File(path, "w") as h5_file:
        for name, value in backbone.weights_to_save().items():
            value = keras.ops.convert_to_numpy(value)
            dataset = h5_file.create_dataset(name, data=value)
            if value.dtype == ml_dtypes.bfloat16:
                dataset.attrs["dtype"] = "bfloat16"
