"""Checkpoint files: the two-file layout (safetensors weights + JSON description), its
format names, reading and writing with checks, and building the velocity network a
description names.

The format itself is described in :mod:`ctflow.priors.checkpoint`, which builds priors from
these files (:func:`~ctflow.priors.checkpoint.load_prior_file`); this module knows no prior
class, so :mod:`ctflow.priors.latent` and :mod:`ctflow.priors.checkpoint` both build on it
without importing each other both ways.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from ctflow._version import __version__
from ctflow.data.atomic import atomic_write_bytes, atomic_write_json
from ctflow.flow.unet import UNet
from ctflow.priors.checkpoint_checks import (CheckpointError, check_description, parse_json,
                                             read_json_file)

__all__ = ["PRIOR_FORMAT", "TRAIN_FORMAT", "FORMAT_VERSION", "CheckpointError", "write_checkpoint",
           "read_checkpoint", "resolve_checkpoint", "sha256_file", "check_safetensors_file",
           "weights_numel",
           "build_velocity", "check_state", "ctflow_version"]

PRIOR_FORMAT = "ctflow-prior"
TRAIN_FORMAT = "ctflow-train-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def ctflow_version() -> str:
    """The version of ctflow recorded in descriptions written now."""
    return __version__


def sha256_file(path: PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def resolve_checkpoint(path: PathLike) -> Tuple[Path, Path]:
    """``(json_path, weights_path)`` of a checkpoint given as a stem, ``.json`` or
    ``.safetensors`` path. Does not check that the files exist."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        stem = p.with_suffix("")
    else:
        stem = p
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def check_safetensors_file(path: PathLike) -> Dict[str, dict]:
    """Validate a safetensors file's header and size without loading tensors.

    The format is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    (tensor name → dtype, shape, data offsets), then the data. The file must be exactly
    ``8 + n + max(end offset)`` bytes long. Returns the header's tensor entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, "
                                  "no complete header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file: header declares "
                                  f"{n} header bytes but the file has {size} bytes")
        if n > (100 << 20):
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is implausibly "
                                  "large; refused")
        try:
            header = parse_json(f.read(n).decode("utf-8"), path)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for k, v in tensors.items():
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry {k!r}") from None
    expected = 8 + n + end
    if size != expected:
        kind = "truncated" if size < expected else "corrupt (trailing bytes in)"
        raise CheckpointError(f"{path}: {kind} safetensors file: header declares "
                              f"{expected} bytes, the file has {size}")
    return tensors


def write_checkpoint(tensors: Dict[str, torch.Tensor], meta: dict, stem: PathLike) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically (temporary file, then
    rename; weights first, description last, so a description always names complete weights).

    ``meta`` is extended with ``weights`` (the file name), ``sha256`` and ``ctflow_version``.
    Returns the JSON path.
    """
    from safetensors.torch import save as st_save

    json_path, w_path = resolve_checkpoint(stem)
    w_path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = st_save(clean, metadata={"format": str(meta.get("format", PRIOR_FORMAT))})
    atomic_write_bytes(w_path, blob)
    meta = dict(meta)
    meta.setdefault("ctflow_version", ctflow_version())
    meta["weights"] = w_path.name
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_json(json_path, meta, default=None)
    return json_path


def weights_numel(tensors: Dict[str, dict]) -> int:
    """The number of values the safetensors header entries ``tensors`` declare."""
    total = 0
    for v in tensors.values():
        n = 1
        for d in v.get("shape", []) if isinstance(v, dict) else []:
            n *= int(d)
        total += n
    return total


def read_checkpoint(path: PathLike, *, verify: bool = True, allow_unverified: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint (stem, ``.json`` or ``.safetensors`` path) → ``(tensors, meta)``.

    Checks existence, the JSON (bounded size and nesting, and the values that size or scale a
    prior: :func:`~ctflow.priors.checkpoint_checks.check_description`, before anything is
    built), the safetensors header and size, and (``verify=True``) the SHA-256 recorded in the
    JSON. A description without ``sha256`` is refused unless ``allow_unverified=True`` (the
    caller accepts weights nobody can check). Errors name the file.
    """
    from safetensors.torch import load_file

    json_path, w_path = resolve_checkpoint(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint description not found: {json_path}")
    meta = read_json_file(json_path)
    if not isinstance(meta, dict) or meta.get("format") not in (PRIOR_FORMAT, TRAIN_FORMAT):
        raise CheckpointError(f"{json_path}: not a ctflow checkpoint description (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if "weights" in meta:
        name = meta["weights"]
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise CheckpointError(f"{json_path}: 'weights' must be a file name beside the "
                                  f"description, got {name!r}")
        w_path = json_path.with_name(name)
    header = check_safetensors_file(w_path)
    numel = weights_numel(header)
    if meta.get("format") == TRAIN_FORMAT:     # model., ema., optim., rng. tensors
        numel = weights_numel({k: v for k, v in header.items() if k.startswith("ema.")})
    check_description(meta, json_path, weights_numel=numel)
    recorded = meta.get("sha256")
    if not recorded and not allow_unverified:
        raise CheckpointError(f"{json_path}: records no sha256 of its weights, so they cannot "
                              "be verified; refused (pass allow_unverified=True to load it "
                              "anyway, or re-save it with save_prior)")
    if recorded is not None and (not isinstance(recorded, str) or len(recorded) != 64):
        raise CheckpointError(f"{json_path}: sha256 must be 64 hex digits, got {recorded!r}")
    if verify and recorded:
        digest = sha256_file(w_path)
        if digest != recorded:
            raise CheckpointError(f"{w_path}: SHA-256 mismatch: the file has {digest}, "
                                  f"{json_path.name} records {recorded}")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{w_path}: cannot read safetensors data ({e})") from None
    return tensors, meta


def build_velocity(model_config: dict) -> torch.nn.Module:
    """The velocity network an architecture config describes."""
    kind = model_config.get("type", "UNet")
    if kind == "UNet":
        return UNet.from_config(model_config)
    raise ValueError(f"unknown velocity model type {kind!r}")


def check_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
    """Raise :class:`CheckpointError` (naming ``where``) unless ``state`` has exactly the tensor
    names and shapes of ``model.state_dict()``."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = [f"{k}: config implies {want[k]}, file has {have[k]}"
              for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{where}: weights do not match the architecture config: "
                              + "; ".join(parts))
