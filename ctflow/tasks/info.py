"""What is usable here: versions, CUDA, CT backends, bundled priors and optional extras.

:func:`info` gathers everything into one JSON-serialisable dict (``ctflow info`` prints it,
:func:`format_info` renders it as text). :func:`resolve_device` turns a user's ``--device``
choice into a :class:`torch.device` and explains, in one line, why a request cannot be met.

Nothing here imports an optional extra at module import time; every probe is guarded, so
``info()`` works on a bare core install and reports *why* something is missing.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import platform
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ctflow._version import __version__

__all__ = ["info", "format_info", "resolve_device", "versions", "DeviceError", "EXTRAS"]

#: Optional extras: import name -> (distribution, how to install it).
EXTRAS = {
    "odl": ("odl", "pip install 'ctflow[odl]'"),
    "astra": ("astra-toolbox", "pip install astra-toolbox"),
    "tomosipo": ("tomosipo", "not on PyPI: pip install git+https://github.com/cicwi/tomosipo "
                             "(needs CUDA)"),
    "medmnist": ("medmnist", "pip install 'ctflow[medmnist]'"),
    "ray": ("ray", "pip install ray"),
}


class DeviceError(ValueError):
    """A device was requested that this machine cannot provide."""


def resolve_device(device: Any = None) -> torch.device:
    """The device to run on.

    ``None`` or ``"auto"`` picks ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
    An explicit ``"cuda"``/``"cuda:N"`` that cannot be honoured raises :class:`DeviceError`
    with the reason (no CUDA build of torch, no visible GPU, or an index out of range).
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = "auto" if device is None else str(device).strip().lower()
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support "
                   f"(torch {torch.__version__})" if torch.version.cuda is None
                   else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"CUDA was requested (--device {name}) but {why}; "
                              "use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
        return dev
    raise DeviceError(f"device {name!r} is not supported; use 'auto', 'cpu' or 'cuda'")


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cuda_info() -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "available": bool(torch.cuda.is_available()),
        "torch_cuda_version": torch.version.cuda,
        "devices": [],
    }
    if out["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["devices"].append({"index": i, "name": props.name,
                                   "memory_gib": round(props.total_memory / 2**30, 1)})
        out["reason"] = ""
    elif torch.version.cuda is None:
        out["reason"] = "torch is a CPU-only build"
    else:
        out["reason"] = "no CUDA device visible"
    return out


def _normalise_backend_entry(name: str, value: Any) -> Dict[str, Any]:
    """Map whatever ``available_backends()`` reports for one backend to ``{usable, reason}``."""
    usable: Optional[bool] = None
    reason = ""
    extra: Dict[str, Any] = {}
    if isinstance(value, bool):
        usable = value
    elif isinstance(value, str):
        usable, reason = False, value
    elif isinstance(value, (tuple, list)) and value and isinstance(value[0], bool):
        usable = value[0]
        reason = "; ".join(str(v) for v in value[1:] if v)
    elif isinstance(value, dict):
        for key in ("usable", "available", "ok"):
            if key in value:
                usable = bool(value[key])
                break
        reason = str(value.get("reason") or value.get("why") or value.get("message") or "")
        extra = {k: v for k, v in value.items()
                 if k not in ("usable", "available", "ok", "reason", "why", "message")}
    elif value is None:
        usable = False
    else:
        for key in ("usable", "available", "ok"):
            if hasattr(value, key):
                usable = bool(getattr(value, key))
                break
        reason = str(getattr(value, "reason", "") or "")
    entry = {"name": name, "usable": bool(usable), "reason": reason}
    entry.update({k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict))
                      else str(v)) for k, v in extra.items()})
    return entry


def _backends() -> Dict[str, Any]:
    try:
        from ctflow.operators import ct
    except Exception as exc:  # the CT package itself failed to import: report why
        return {"error": f"ctflow.operators.ct failed to import: {exc}", "backends": []}
    fn = getattr(ct, "available_backends", None)
    if fn is None:
        return {"error": "ctflow.operators.ct provides no available_backends()", "backends": []}
    try:
        raw = fn()
    except Exception as exc:
        return {"error": f"available_backends() failed: {exc}", "backends": []}
    entries: List[Dict[str, Any]] = []
    if isinstance(raw, dict):
        for name, value in raw.items():
            entries.append(_normalise_backend_entry(str(name), value))
    else:
        for item in raw:
            if isinstance(item, str):
                entries.append({"name": item, "usable": True, "reason": ""})
            elif isinstance(item, dict) and "name" in item:
                entries.append(_normalise_backend_entry(str(item["name"]), item))
            else:
                entry = _normalise_backend_entry(str(getattr(item, "name", item)), item)
                for key in ("backend", "impl"):
                    if hasattr(item, key):
                        entry[key] = str(getattr(item, key))
                entries.append(entry)
    return {"error": "", "backends": entries}


def _priors() -> Dict[str, Any]:
    try:
        from ctflow.priors.registry import list_priors

        return {"error": "", "names": list(list_priors()),
                "details": list(list_priors(details=True))}
    except Exception as exc:  # noqa: BLE001 - info() reports why instead of failing
        return {"error": f"prior registry unavailable: {exc}", "names": [], "details": []}


def versions() -> Dict[str, str]:
    """Versions recorded in summaries: ctflow, torch, numpy, pydicom, python, platform."""
    out = {"ctflow": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": sys.version.split()[0], "platform": platform.platform()}
    pydicom = _version("pydicom")
    if pydicom is not None:
        out["pydicom"] = pydicom
    return out


def _extras() -> Dict[str, Any]:
    out = {}
    for module, (dist, hint) in EXTRAS.items():
        version = _version(dist)
        entry: Dict[str, Any] = {"distribution": dist, "installed": version is not None,
                                 "version": version, "install": hint}
        if module == "astra" and version is not None:
            # astra.use_cuda() is safe (no 3D call); ASTRA 3D calls without CUDA kill Python.
            try:
                astra = importlib.import_module("astra")
                entry["cuda"] = bool(astra.use_cuda())
            except Exception as exc:
                entry["error"] = f"import failed: {exc}"
        out[module] = entry
    return out


def info() -> Dict[str, Any]:
    """Everything :command:`ctflow info` reports, as a JSON-serialisable dict.

    Keys: ``ctflow``, ``python``, ``platform``, ``torch``, ``numpy`` (versions), ``cuda``
    (availability, devices, or the reason it is absent), ``default_device``, ``ct_backends``
    (each backend/implementation usable here or not, and why, from
    :func:`ctflow.operators.ct.available_backends`), ``priors`` (bundled prior names) and
    ``extras`` (optional packages present).
    """
    return {
        "ctflow": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda_info(),
        "default_device": str(resolve_device(None)),
        "ct_backends": _backends(),
        "priors": _priors(),
        "extras": _extras(),
    }


def format_info(data: Optional[Dict[str, Any]] = None) -> str:
    """Render :func:`info` as aligned text."""
    d = info() if data is None else data
    lines = [
        f"ctflow   {d['ctflow']}",
        f"python   {d['python']}  ({d['platform']})",
        f"torch    {d['torch']}  ({d['torch_threads']} CPU threads)",
        f"numpy    {d['numpy']}",
    ]
    cuda = d["cuda"]
    if cuda["available"]:
        devs = ", ".join(f"cuda:{x['index']} {x['name']} ({x['memory_gib']} GiB)"
                         for x in cuda["devices"])
        lines.append(f"CUDA     yes, CUDA {cuda['torch_cuda_version']}: {devs}")
    else:
        lines.append(f"CUDA     no ({cuda['reason']})")
    lines.append(f"device   {d['default_device']} (what --device auto picks)")
    lines.append("")
    lines.append("CT backends:")
    be = d["ct_backends"]
    if be["error"]:
        lines.append(f"  unavailable: {be['error']}")
    width = max([len(b["name"]) for b in be["backends"]] + [8])
    for b in be["backends"]:
        mark = "yes" if b["usable"] else "no "
        reason = f"  {b['reason']}" if b["reason"] else ""
        lines.append(f"  {b['name']:<{width}}  {mark}{reason}")
    lines.append("")
    pri = d["priors"]
    if pri["error"]:
        lines.append(f"priors   {pri['error']}")
    else:
        lines.append("priors   " + (", ".join(pri["names"]) if pri["names"] else "(none bundled)"))
        for p in pri.get("details", []):
            size = (f"{p['image_size']}²" if p["image_size"] is not None
                    else f"any N² (N a multiple of {p['size_multiple']})")
            mm = f", {p['pixel_mm'][0]:g}-{p['pixel_mm'][1]:g} mm pixels" if p["pixel_mm"] else ""
            hu = f", HU {p['hu_window'][0]:g}..{p['hu_window'][1]:g}" if p["hu_window"] else ""
            lines.append(f"         {p['name']}: {p['kind']}, {size}{mm}{hu}")
    lines.append("")
    lines.append("optional extras:")
    for name, e in d["extras"].items():
        if e["installed"]:
            note = f"  {e['version']}"
            if "cuda" in e:
                note += f" (CUDA: {'yes' if e['cuda'] else 'no'})"
            if e.get("error"):
                note += f" ({e['error']})"
            lines.append(f"  {name:<9} yes{note}")
        else:
            lines.append(f"  {name:<9} no   {e['install']}")
    return "\n".join(lines)
