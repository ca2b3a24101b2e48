"""The command line: every argument parser of ctflow lives in this package."""
from ctflow.cli.main import main

__all__ = ["main"]
