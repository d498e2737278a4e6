"""The library's version, importable without the package root (which every layer must not import)."""

__version__ = "0.1.0"
