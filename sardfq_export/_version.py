"""The one version source: pyproject.toml reads it at build time, the package at run time."""

__version__ = "0.2.0"
