"""The ctflow version (one place; the root package and the checkpoint writer read it)."""
__version__ = "0.1.0"
