r"""Where benchmarks read and write: paths, the suites' configs, tuned settings, device, threads.

* ``benchmarks/configs/<suite>.json`` hold every option a case runs with (``methods``) and the
  tuning record (:func:`load_config`, :func:`save_config`);
* ``--settings FILE`` lays tuned options over a suite's config for one run
  (:func:`load_settings`, :func:`apply_settings`): the file ``tune`` writes (``{method:
  {"chosen": {...}, ...}}``) or a config-like ``{"methods": {method: {...}}}``;
* results go to ``--out``; without it (:func:`default_out`) a full run started in the
  repository root writes the committed ``benchmarks/results``, every other run (``--quick``,
  or started in another folder) ``<current folder>/bench-results`` (``.../quick`` for quick
  runs), never into the source tree of another folder.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ctflow.data import atomic_write_json

from benchmarks.store import read_json_object

__all__ = ["REPO_ROOT", "RESULTS_DIR", "CONFIG_DIR", "default_out", "load_config",
           "save_config", "load_settings", "apply_settings", "check_device", "set_threads"]

#: The repository root (holds ``benchmarks/``); worker processes and Ray tasks import from it.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The committed results of the full runs.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Tuned hyper-parameters, one JSON file per suite.
CONFIG_DIR = REPO_ROOT / "benchmarks" / "configs"
#: The folder (under the current one) of runs other than full runs from the repository root.
LOCAL_RESULTS = "bench-results"


def default_out(quick: bool, cwd: Optional[Path] = None) -> Path:
    """The result folder when ``--out`` is not given: :data:`RESULTS_DIR` for a full run
    started in the repository root, else ``<cwd>/bench-results``; ``/quick`` added for quick
    runs."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if not quick and cwd.resolve() == REPO_ROOT:
        return RESULTS_DIR
    base = cwd / LOCAL_RESULTS
    return base / "quick" if quick else base


def load_config(suite: str) -> dict:
    """``benchmarks/configs/<suite>.json`` (the methods' options and the tuning record)."""
    path = CONFIG_DIR / f"{suite}.json"
    cfg = read_json_object(path, "benchmark config")
    if not isinstance(cfg.get("methods"), dict):
        raise ValueError(f"{path}: expected a 'methods' object mapping method -> options")
    return cfg


def save_config(suite: str, cfg: dict) -> Path:
    """Write a suite's config atomically (``ctflow.data.atomic_write_json``)."""
    path = CONFIG_DIR / f"{suite}.json"
    atomic_write_json(path, cfg, default=None)
    return path


def load_settings(path) -> Dict[str, Dict[str, Any]]:
    """Tuned options per method from a settings file: ``tune``'s output ``{method: {"chosen":
    {...}, ...}}`` or a config-like ``{"methods": {method: {...}}}``. ``FileNotFoundError`` /
    ``ValueError`` name the file."""
    path = Path(path)
    data = read_json_object(path, "settings")
    if isinstance(data.get("methods"), dict):
        methods = data["methods"]
    else:
        methods = {m: v["chosen"] for m, v in data.items()
                   if isinstance(v, dict) and isinstance(v.get("chosen"), dict)}
    if not methods or not all(isinstance(v, dict) for v in methods.values()):
        raise ValueError(f"{path}: no tuned settings found; expected {{method: {{\"chosen\": "
                         f"{{...}}}}}} (written by tune) or {{\"methods\": {{method: {{...}}}}}}")
    return {str(m): dict(v) for m, v in methods.items()}


def apply_settings(ctx, path) -> Dict[str, Dict[str, Any]]:
    """Lay the tuned options of ``path`` over the suite config of ``ctx`` (this run only;
    the config file is not changed). The rows' ``config`` hash covers the result."""
    settings = load_settings(path)
    cfg = copy.deepcopy(ctx.config())
    unknown = sorted(set(settings) - set(cfg["methods"]))
    if unknown:
        raise ValueError(f"{path}: settings for method(s) {unknown} that suite {ctx.suite!r} "
                         f"does not run ({', '.join(cfg['methods'])})")
    for method, opts in settings.items():
        cfg["methods"][method].update(opts)
    cfg["settings_file"] = {"path": str(Path(path).resolve()), "methods": settings}
    ctx._config = cfg
    return settings


def check_device(device: str, *, on_ray: bool = False) -> None:
    """``ValueError`` unless ``device`` is ``cpu``, ``cuda`` or ``cuda:N`` and (off Ray)
    available on this machine."""
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    # on Ray the tasks run on the cluster's GPUs; this (driver) machine may have none
    if device.startswith("cuda") and not on_ray and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; "
                         f"use --device cpu")


def set_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads here and in every worker process started later
    (``OMP_NUM_THREADS``, ``CTFLOW_BENCH_THREADS``)."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    os.environ["OMP_NUM_THREADS"] = str(int(threads))
    os.environ["CTFLOW_BENCH_THREADS"] = str(int(threads))
