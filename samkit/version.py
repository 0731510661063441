"""The package version, in a module of its own so that commands can print it without importing
the whole library."""

__version__ = "0.1.0"
