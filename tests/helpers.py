"""Small operators and command-line runners shared by the tests.

Imported as ``from helpers import ...``: ``tests/`` is not a package, so pytest (rootdir
``conftest.py``, the default ``prepend`` import mode) puts this folder on ``sys.path`` before
it imports a test module.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence, Union

import pytest
import torch

from ctflow.operators import LinearOperator

#: The repository root (the working directory of the command-line runs).
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- operators
class Dense(LinearOperator):
    """A dense matrix ``W`` (m × n_pixels) acting on flattened images:
    ``(B, C, *shape) -> (B, C, m)``; ``shape`` is an int ``n`` (``(n, n)`` images) or a
    tuple. No closed-form shifted normal solve (the solvers use CG)."""

    name = "Dense"

    def __init__(self, W: torch.Tensor, shape: Union[int, Sequence[int]]):
        shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
        super().__init__(shape, (W.shape[0],))
        self.W = W

    def _forward(self, x):
        return x.reshape(*x.shape[:2], -1) @ self.W.T.to(x)

    def _adjoint(self, y):
        return (y @ self.W.to(y)).reshape(*y.shape[:2], *self.domain_shape)


class Mask(LinearOperator):
    """Pixel mask (inpainting) ``x -> m * x`` on the last two axes of ``mask``, with the
    closed-form shifted normal solve :math:`(m^2 + s)^{-1} b`."""

    name = "Mask"

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[-2:], mask.shape[-2:])
        self.mask = mask

    def _forward(self, x):
        return x * self.mask.to(x)

    def _adjoint(self, y):
        return y * self.mask.to(y)

    def solve_shifted_normal(self, b, shift):
        return b / (self.mask.to(b) ** 2 + shift)


# ------------------------------------------------------------------------------- command line
class Result:
    """What a command-line run returned: ``returncode``, ``stdout``, ``stderr``."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    """``python -m ctflow ARGS`` in a fresh process (from the repository root)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "ctflow", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture()
def cli(capsys):
    """Run ``ctflow.cli.main`` in this process (faster than a subprocess: no new torch
    import); returns a :class:`Result`. The subprocess tests check the real exit status."""
    from ctflow.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(rc, out, err)
    return run


def chest_copy(tmp_path: Path, n: int) -> Path:
    """The first ``n`` slices of the bundled chest sample copied into ``tmp_path / "in"``."""
    import shutil

    from ctflow.data import sample_path

    src = tmp_path / "in"
    src.mkdir()
    for f in sorted(sample_path("chest-subset").glob("*.dcm"))[:n]:
        shutil.copy2(f, src / f.name)
    return src
