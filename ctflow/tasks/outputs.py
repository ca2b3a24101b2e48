"""The output folder of ``reconstruct-dicom``: checks, lock, earlier runs, summary records.

* :func:`check_folders` -- the input is a folder, the output is not it (nor inside it);
* :func:`series_description` and :func:`settings_key` -- the derived series' description
  (its SeriesInstanceUID is a function of it) and the settings a resumed run must share;
* :func:`read_previous` -- the ``summary.json`` of an earlier run, refused without ``resume``
  or with other settings;
* :func:`check_no_clash`, :func:`locked_out_dir`, :func:`valid_output`, :func:`set_aside` --
  existing outputs are never overwritten, one writer per folder, a damaged or foreign leftover
  is renamed aside (never deleted);
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
           "check_no_clash", "locked_out_dir", "valid_output", "set_aside", "read_output_hu",
           "record_from_file", "fill_summary", "finite_or_none", "LOCK_NAME"]

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
            "sinogram", "options", "hu_window", "source_series_uid")
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
    level = (f"noise {100 * noise['relative']:g}%" if "relative" in noise
             else f"sigma {noise['sigma']:g}")
    if settings.get("sinogram"):
        meas = f"measured {Path(settings['sinogram']).name}"
    else:
        meas = f"{settings['views']} views {level}"
    text = (f"ctflow {settings['method']}{prior} {settings['geometry']} {meas} "
            f"{settings['size']}px seed {settings['seed']}")
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
    """Hold an exclusive lock on ``OUT_DIR/`` :data:`LOCK_NAME` (one writer per folder), then
    remove temporary files an interrupted run of ours left behind (hidden
    ``.<name>.<random>.tmp`` files of the atomic writes; never a finished output)."""
    f = open(out_dir / LOCK_NAME, "a+")
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
        for tmp in out_dir.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
        yield
    finally:
        f.close()


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
