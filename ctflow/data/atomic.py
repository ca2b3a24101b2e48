"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Every write goes to a hidden temporary file beside the target (``.<name>.<random><suffix>``,
so it is on the same file system), gets the usual file mode (``0o666`` less the umask; the
temporary file is created ``0o600``), and is then renamed over the target with
:func:`os.replace`. On any failure the temporary file is removed and the target is untouched.
The folder of the target must exist.

This is the only temporary-file-and-rename implementation of the package: checkpoints
(:mod:`ctflow.priors.checkpoint_io`), DICOM files (:mod:`ctflow.data.dicom_write`), NIfTI files
(:mod:`ctflow.data.nifti`), HDF5 result stores (:mod:`ctflow.data.hdf5`), the DICOM pipeline's
summary (:mod:`ctflow.tasks.series`), the command line's outputs and the benchmark results all
write through it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "json_default"]

PathLike = Union[str, "os.PathLike[str]"]


def _file_mode() -> int:
    """``0o666`` less the process umask (the mode ``open()`` would give a new file)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(path: PathLike, writer: Callable[[Path], None], *,
                suffix: str = ".tmp", overwrite: bool = True) -> None:
    """Call ``writer(tmp)`` on a hidden temporary path beside ``path``, then rename it to
    ``path``. ``suffix`` ends the temporary name (writers that add or check an extension,
    such as ``numpy.save`` or ``nibabel.save``, need the target's own). The temporary file
    exists (empty) when ``writer`` is called; ``writer`` may replace or truncate it.

    ``overwrite=False`` raises ``FileExistsError`` instead of replacing a ``path`` that exists
    when the new file is complete (one that appeared while writing, say)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, _file_mode())
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(f"{path}: file exists (it appeared while writing); refusing "
                                  f"to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename);
    ``overwrite`` as for :func:`atomic_save`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write, overwrite=overwrite)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8",
                      overwrite: bool = True) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding`` (no newline
    translation: what ``text`` holds is what the file holds)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)


def json_default(o: Any) -> Any:
    """JSON for the values results hold besides the JSON types: NumPy scalars as numbers,
    small tensors as lists (larger ones by their shape), anything else as ``str(o)``."""
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist() if o.numel() <= 16 else f"tensor{tuple(o.shape)}"
    return str(o)


def atomic_write_json(path: PathLike, obj: Any, *,
                      default: Optional[Callable[[Any], Any]] = json_default) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented UTF-8 JSON with a final newline.
    ``default`` converts values JSON has no type for (:func:`json_default`); ``None`` refuses
    them (``TypeError``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=default) + "\n")
