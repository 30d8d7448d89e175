"""Installs the repository's top-level folders as one package, ``lmq``.

``core/``, ``plugins/``, ``workers/`` and ``api/`` stay at the top of the checkout, where
the design names them, and install as ``lmq.core``, ``lmq.plugins``, ``lmq.workers`` and
``lmq.api``; ``lmq/`` holds the package's own ``__init__`` and the plugin kit. Everything
else about the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = ("core", "plugins", "workers", "api")

setup(
    package_dir={"lmq": "lmq", **{f"lmq.{folder}": folder for folder in FOLDERS}},
    packages=["lmq", *(f"lmq.{package}" for package in find_packages(include=[f"{f}*" for f in FOLDERS]))],
)
