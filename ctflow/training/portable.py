"""No machine-specific path in what goes into a repository (bundled priors, compact training
states): :func:`portable` rewrites absolute paths in recorded commands and descriptions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["portable"]


def portable(obj: Any, run_dir: Optional[Path] = None, *, cwd: Optional[Path] = None) -> Any:
    """``obj`` (a string, or lists/dicts of them, recursively) with the run folder written as
    ``runs/<name>`` and any other absolute path below the parent of ``cwd`` (default: the
    current directory) written relative to ``cwd`` (``/x/shared/data`` from ``/x/main`` becomes
    ``../shared/data``, the form the documented commands use). Other values are returned
    unchanged."""
    here = Path(cwd or os.getcwd()).resolve()
    pairs = []
    if run_dir is not None:
        pairs.append((str(Path(run_dir).resolve()), f"runs/{Path(run_dir).name}"))
    pairs.append((str(here) + os.sep, ""))
    if here.parent != here:
        pairs.append((str(here.parent) + os.sep, ".." + os.sep))

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            for old, new in pairs:
                v = v.replace(old, new)
            return v
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, tuple):
            return tuple(fix(x) for x in v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return fix(obj)
