"""The command line: every argument parser of ctflow lives in this package.

:func:`main` is the ``ctflow`` console script (``ctflow.cli:main``); one module per command
(:mod:`~ctflow.cli.reconstruct`, :mod:`~ctflow.cli.dicom`, :mod:`~ctflow.cli.train`,
:mod:`~ctflow.cli.evaluate`, :mod:`~ctflow.cli.bench`, :mod:`~ctflow.cli.throughput`,
:mod:`~ctflow.cli.info`), the shared helpers in :mod:`~ctflow.cli.common`. Nothing else in
ctflow imports this package.
"""
from ctflow.cli.common import (CLIError, add_ray_arguments, parse_options, parse_slices,
                               set_threads)
from ctflow.cli.main import build_parser, main

__all__ = ["main", "build_parser", "CLIError", "parse_slices", "parse_options",
           "add_ray_arguments", "set_threads"]
