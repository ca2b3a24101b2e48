"""The output folder of ``reconstruct-dicom``: checks, lock, earlier runs, summary records.

* :func:`check_folders` -- the input is a folder, the output is not it (nor inside it);
* :func:`series_description` and :func:`settings_key` -- the derived series' description
  (its SeriesInstanceUID is a function of it) and the settings a resumed run must share;
* :func:`read_previous` -- the ``summary.json`` of an earlier run, refused without ``resume``
  or with other settings;
* :func:`check_no_clash`, :func:`locked_out_dir`, :func:`valid_output`, :func:`set_aside` --
  existing outputs are never overwritten, one writer per folder (the lock file is removed
  afterwards), a damaged or foreign leftover is renamed aside (never deleted);
* :func:`choose_series_uid`, :func:`grid_note` -- the derived series' UID (new per run,
  stable on request, reused on resume) and what the written grid says about the working one;
* :func:`record_from_file`, :func:`fill_summary` -- per-slice records and their means.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ctflow.metrics import psnr, ssim
from ctflow.tasks.problem import to_working_size

__all__ = ["check_folders", "series_description", "settings_key", "read_previous",
           "check_no_clash", "locked_out_dir", "choose_series_uid", "grid_note", "discard_empty_run",
           "remove_stale_temps",
           "valid_output",
           "set_aside", "read_output_hu", "record_from_file", "fill_summary", "finite_or_none",
           "LOCK_NAME"]

#: The lock file held by a run in its output folder.
LOCK_NAME = ".ctflow-reconstruct-dicom.lock"


def finite_or_none(v: Optional[float]) -> Optional[float]:
    """``float(v)``, or ``None`` for ``None`` and non-finite values (JSON has no inf)."""
    return float(v) if v is not None and math.isfinite(float(v)) else None


def check_folders(in_dir: Path, out_dir: Path) -> None:
    """``in_dir`` is an existing folder; ``out_dir`` is not it, not inside it, and a folder if
    it exists (``FileNotFoundError``/``NotADirectoryError``/``ValueError`` otherwise)."""
    if not in_dir.exists():
        raise FileNotFoundError(f"input folder not found: {in_dir}")
    if not in_dir.is_dir():
        raise NotADirectoryError(f"input must be a folder holding a DICOM series: {in_dir}")
    a, b = out_dir.resolve(), in_dir.resolve()
    if a == b or b in a.parents:
        raise ValueError(f"OUT_DIR {out_dir} is the input folder {in_dir} or inside it; "
                         "choose a separate output folder (inputs are never modified)")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"OUT_DIR exists and is not a folder: {out_dir}")


def settings_key(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings that must agree between a run and the run it resumes."""
    keys = ("method", "prior", "views", "geometry", "noise", "size", "seed", "backend",
            "sinogram", "options", "preset", "hu_window", "source_series_uid")
    return {k: settings.get(k) for k in keys}


def series_description(settings: Dict[str, Any], *, with_prior: bool) -> str:
    """The derived series' description: the method and its settings (``with_prior``: name the
    prior, for the methods that use one). The writer puts the first 64 characters into
    SeriesDescription and the whole text into DerivationDescription; the derived
    SeriesInstanceUID is a function of it (same settings, same series)."""
    prior = ""
    if settings.get("prior") and with_prior:
        p = str(settings["prior"])
        prior = " " + (Path(p).stem if ("/" in p or os.sep in p) else p)
    noise = settings["noise"]
    if noise.get("model") == "poisson":
        level = f"dose I0 {noise['I0']:g}"
    else:
        level = (f"noise {100 * noise['relative']:g}%" if "relative" in noise
                 else f"sigma {noise['sigma']:g}")
    if settings.get("sinogram"):
        meas = f"measured {Path(settings['sinogram']).name}"
    else:
        meas = f"{settings['views']} views {level}"
    text = (f"ctflow {settings['method']}{prior} {settings['geometry']} {meas} "
            f"{settings['size']}px seed {settings['seed']}")
    if settings.get("preset"):
        text += f" preset {settings['preset']}"
    if settings.get("options"):
        text += " " + " ".join(f"{k}={json.dumps(v)}" for k, v in
                               sorted(settings["options"].items()))
    return text


def read_previous(summary_path: Path, settings: Dict[str, Any], *, resume: bool
                  ) -> Dict[str, Any]:
    """The summary of an earlier run in the folder (``{}`` if none). Without ``resume`` an
    earlier run is refused (``FileExistsError``); with it, its settings must be these."""
    if not summary_path.exists():
        return {}
    try:
        previous = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{summary_path}: unreadable summary of an earlier run ({exc}); "
                         "choose another OUT_DIR") from None
    out_dir = summary_path.parent
    if not resume:
        raise FileExistsError(f"OUT_DIR {out_dir} holds an earlier run (summary.json); "
                              "pass --resume to continue it or choose another folder")
    old, new = settings_key(previous.get("settings", {})), settings_key(settings)
    if old != new:
        diff = [k for k in new if old.get(k) != new.get(k)]
        raise ValueError(f"--resume: the run in {out_dir} used different settings "
                         f"({', '.join(diff)}); rerun with the same settings or choose "
                         "another OUT_DIR")
    return previous


def check_no_clash(paths: Sequence[Path]) -> None:
    """``FileExistsError`` if any of the outputs ``paths`` exists (a run without resume)."""
    clash = [p for p in paths if p.exists()]
    if clash:
        raise FileExistsError(f"output file exists: {clash[0]} ({len(clash)} in all); pass "
                              "--resume to keep them and continue, or choose another OUT_DIR")


@contextlib.contextmanager
def locked_out_dir(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``OUT_DIR/`` :data:`LOCK_NAME` (one writer per folder) and
    remove the lock file again when done (success or failure). Nothing else in the folder is
    touched: a hidden temporary file of an atomic write is removed by that write itself when
    it fails, and files of others (a user's ``.notes.tmp``, say) are never deleted."""
    path = out_dir / LOCK_NAME
    f = open(path, "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no lock, still safe for one writer
        pass
    except OSError:
        f.close()
        raise FileExistsError(f"another reconstruct-dicom run is writing {out_dir}; wait for "
                              "it to finish or choose another OUT_DIR") from None
    try:
        yield
    finally:
        try:    # remove the lock file only if it is still the one this run locked
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                path.unlink()
        except OSError:
            pass
        f.close()


def choose_series_uid(previous: Dict[str, Any], stable_uid: str, *, stable: bool) -> str:
    """The derived SeriesInstanceUID of a run: the one an earlier run recorded in its
    ``summary.json`` (``previous``; ``resume`` adds to the same series), else ``stable_uid``
    (a function of the source series and the settings) when ``stable``, else a new random
    UID. With ``stable`` an earlier run of another series is refused (``ValueError``)."""
    from pydicom.uid import generate_uid

    recorded = previous.get("derived_series_uid")
    if stable and recorded not in (None, stable_uid):
        raise ValueError(f"--resume --stable-uids: the earlier run in this OUT_DIR wrote the "
                         f"derived series {recorded}, not {stable_uid}; choose another OUT_DIR")
    if recorded:
        return str(recorded)
    return stable_uid if stable else generate_uid()


def grid_note(n: int, hu_shape: Sequence[int], spacing: Sequence[float]) -> Dict[str, Any]:
    """How the written slices relate to the grid they were reconstructed on: the derived
    series keeps the source's grid (Rows, Columns, PixelSpacing, positions); when the working
    size ``n`` differs from the padded square side, the reconstruction was up- (or down-)
    sampled to it. ``resampled`` and ``text`` go into ImageType (``RESAMPLED``) and
    DerivationDescription; the whole dict into ``summary.json``."""
    rows, cols = int(hu_shape[0]), int(hu_shape[1])
    side = max(rows, cols)
    pixel = float(side * max(float(spacing[0]), float(spacing[1])) / n)
    resampled = n != side
    text = (f"reconstructed on a {n}x{n} grid of {pixel:.4g} mm pixels, "
            + (f"re-sampled (bicubic) to the source's {rows}x{cols} grid" if resampled
               else f"at the source's {rows}x{cols} grid"))
    return {"working_size": int(n), "working_pixel_mm": pixel, "written_shape": [rows, cols],
            "written_pixel_mm": [float(spacing[0]), float(spacing[1])],
            "resampled": bool(resampled), "text": text}


def remove_stale_temps(out_dir: Path, names: Sequence[str]) -> List[Path]:
    """On ``--resume``: remove the temporary files a killed run of this series left behind --
    only names of the exact form our atomic writer gives the temporary of one of ``names``
    (this series' outputs, its ``summary.json``, ``montage.png``): ``.<name>.<8
    characters>.tmp``. Any other file (a user's ``.notes.tmp``) is never touched."""
    import re

    removed = []
    for name in names:
        pattern = re.compile(r"^\." + re.escape(name) + r"\.[A-Za-z0-9_]{8}\.tmp$")
        for tmp in out_dir.glob(f".{_glob_escape(name)}.*.tmp"):
            if pattern.match(tmp.name) and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
                removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped."""
    import glob

    return glob.escape(name)


def discard_empty_run(out_dir: Path, summary_path: Path, *, own_summary: bool,
                      remove_dir: bool) -> None:
    """After a run that failed before writing its first slice: remove the ``summary.json`` it
    wrote (``own_summary``: there was none before) and, ``remove_dir``, the folder it created
    if nothing else is in it. Files of others are never touched."""
    if own_summary:
        summary_path.unlink(missing_ok=True)
    if remove_dir:
        try:
            out_dir.rmdir()     # only succeeds when empty
        except OSError:
            pass


def valid_output(path: Path, series_uid: Optional[str]) -> bool:
    """Does ``path`` hold a readable DICOM image (of the derived series ``series_uid``)?"""
    import pydicom

    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False)
        ok = "PixelData" in ds and int(ds.Rows) > 0 and int(ds.Columns) > 0
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * \
            int(ds.get("SamplesPerPixel", 1))
        ok = ok and len(ds.PixelData) >= expected
        if series_uid is not None:
            ok = ok and str(ds.SeriesInstanceUID) == series_uid
        return bool(ok)
    except Exception:  # noqa: BLE001 - any parse failure means "not a valid output"
        return False


def set_aside(path: Path) -> Path:
    """Rename an invalid leftover to ``<name>.invalid-<time>`` (never delete it)."""
    aside = path.with_name(path.name + f".invalid-{int(time.time())}")
    os.replace(path, aside)
    return aside


def read_output_hu(path: Path) -> np.ndarray:
    """The HU image of a written output slice."""
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)


def record_from_file(path: Path, x, k: int, sop: str, window, n: int) -> Dict[str, Any]:
    """Metrics of an output written by an interrupted run whose record was not saved."""
    small = to_working_size(read_output_hu(path), n, hu_window=window)
    return {"index": k, "sop_instance_uid": sop, "output_file": path.name,
            "psnr": finite_or_none(psnr(small, x)), "ssim": float(ssim(small, x)),
            "seconds": None, "metrics_from": "output file (re-sampled)"}


def fill_summary(summary: Dict[str, Any], others: List[Dict[str, Any]],
                 records: List[Dict[str, Any]], done: int, skipped: int,
                 t_start: float) -> None:
    """Per-slice records (earlier runs' slices outside this range included, by slice index);
    means over every slice in the summary; seconds per slice over this run's solves."""
    summary["slices"] = sorted(list(others) + list(records), key=lambda r: r.get("index", 0))
    ps = [r["psnr"] for r in summary["slices"] if r.get("psnr") is not None]
    ss = [r["ssim"] for r in summary["slices"] if r.get("ssim") is not None]
    summary["slices_reconstructed"] = done
    summary["slices_skipped"] = skipped
    summary["mean"] = {"psnr": float(np.mean(ps)) if ps else None,
                       "ssim": float(np.mean(ss)) if ss else None,
                       "seconds_per_slice": float(np.mean([r["seconds"] for r in records
                                                           if not r.get("resumed")]))
                       if done else None}
    summary["seconds_total"] = time.perf_counter() - t_start
