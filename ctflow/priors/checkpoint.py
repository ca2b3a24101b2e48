r"""Safe checkpoints: safetensors weights plus a JSON description; never pickle.

A prior on disk is a pair of files sharing one stem:

* ``<stem>.safetensors`` — the weights (tensor name → tensor), nothing executable;
* ``<stem>.json`` — the description: ``format``, architecture ``model`` config, ``image_size``,
  ``channels``, normalisation ``scale``/``shift`` (model space :math:`x_m = a x + b`),
  ``hu_window``, the ``data`` the prior was trained on (including the patient split),
  ``training`` (steps, final loss, wall time, command), ``ctflow_version``, the weights file
  name and its ``sha256``.

Reading checks, in this order, and raises an error naming the file and the problem:
the JSON exists and parses (``FileNotFoundError`` / ``ValueError``); the weights file exists;
its safetensors header is complete and the file size equals the size the header declares
(a truncated file is caught before any tensor is read); its SHA-256 equals the recorded one;
and, when a prior is built, the tensor names and shapes equal those the architecture config
implies.

Training checkpoints (``format = "ctflow-train-checkpoint"``, written by
:mod:`ctflow.training.prior`) use the same two-file layout with the tensors prefixed ``model.``,
``ema.``, ``optim.`` and ``rng.``; :func:`load_prior_file` accepts them too and takes the EMA
weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ctflow.data.atomic import atomic_write_bytes, atomic_write_json

__all__ = ["PRIOR_FORMAT", "TRAIN_FORMAT", "CheckpointError", "save_prior", "load_prior_file",
           "write_checkpoint", "read_checkpoint", "resolve_checkpoint", "sha256_file",
           "check_safetensors_file", "build_velocity"]

PRIOR_FORMAT = "ctflow-prior"
TRAIN_FORMAT = "ctflow-train-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated or does not match its description."""


def _version() -> str:
    try:
        from ctflow._version import __version__
        return __version__
    except ImportError:  # pragma: no cover - partially initialised package
        return "unknown"


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
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    meta.setdefault("ctflow_version", _version())
    meta["weights"] = w_path.name
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_json(json_path, meta, default=None)
    return json_path


def read_checkpoint(path: PathLike, *, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint (stem, ``.json`` or ``.safetensors`` path) → ``(tensors, meta)``.

    Checks existence, the JSON, the safetensors header and size, and (``verify=True``) the
    SHA-256 recorded in the JSON. Errors name the file.
    """
    from safetensors.torch import load_file

    json_path, w_path = resolve_checkpoint(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint description not found: {json_path}")
    try:
        meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (PRIOR_FORMAT, TRAIN_FORMAT):
        raise CheckpointError(f"{json_path}: not a ctflow checkpoint description (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if "weights" in meta:
        name = meta["weights"]
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise CheckpointError(f"{json_path}: 'weights' must be a file name beside the "
                                  f"description, got {name!r}")
        w_path = json_path.with_name(name)
    check_safetensors_file(w_path)
    if verify and meta.get("sha256"):
        digest = sha256_file(w_path)
        if digest != meta["sha256"]:
            raise CheckpointError(f"{w_path}: SHA-256 mismatch: the file has {digest}, "
                                  f"{json_path.name} records {meta['sha256']}")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{w_path}: cannot read safetensors data ({e})") from None
    return tensors, meta


def build_velocity(model_config: dict) -> torch.nn.Module:
    """The velocity network an architecture config describes."""
    kind = model_config.get("type", "UNet")
    if kind == "UNet":
        from ctflow.flow.unet import UNet
        return UNet.from_config(model_config)
    raise ValueError(f"unknown velocity model type {kind!r}")


def _check_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
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


def save_prior(prior_or_model, path_stem: PathLike, *, model_config: Optional[dict] = None,
               image_size: Optional[int] = None, channels: Optional[int] = None,
               scale: Optional[float] = None, shift: Optional[float] = None,
               hu_window=None, name: Optional[str] = None, data: Optional[dict] = None,
               training: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save a prior (a :class:`~ctflow.priors.base.FlowPrior` with a module velocity, or a
    bare velocity module) as ``<path_stem>.safetensors`` + ``<path_stem>.json``.

    Keyword values override those of the prior; for a bare module ``image_size`` is required
    (``channels`` defaults to the model's, ``scale=2, shift=-1``). ``model_config`` defaults
    to ``module.config``. ``data`` describes the training data (sources, patient split),
    ``training`` the run (steps, final loss, command, wall time). Weights are stored in
    ``dtype`` (float32 or float16); loading converts back to float32. Returns the JSON path.
    """
    from ctflow.priors.base import FlowPrior

    if isinstance(prior_or_model, FlowPrior):
        prior = prior_or_model
        module = prior.velocity
        image_size = prior.image_size if image_size is None else image_size
        channels = prior.channels if channels is None else channels
        scale = prior.scale if scale is None else scale
        shift = prior.shift if shift is None else shift
        hu_window = prior.hu_window if hu_window is None else hu_window
        name = prior.name if name is None else name
    else:
        module = prior_or_model
    if not isinstance(module, torch.nn.Module):
        raise ValueError("save_prior needs a torch.nn.Module velocity (closed-form velocity "
                         f"fields have no weights), got {type(module).__name__}")
    model_config = dict(model_config if model_config is not None
                        else getattr(module, "config", None) or {})
    if not model_config:
        raise ValueError("save_prior: the module has no .config; pass model_config=...")
    if image_size is None:
        raise ValueError("save_prior: image_size is required for a bare module")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    channels = int(channels if channels is not None else model_config.get("channels", 1))
    meta = {
        "format": PRIOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or Path(path_stem).name,
        "model": model_config,
        "image_size": int(image_size),
        "channels": channels,
        "scale": float(2.0 if scale is None else scale),
        "shift": float(-1.0 if shift is None else shift),
        "hu_window": list(hu_window) if hu_window is not None else None,
        "time_convention": "t=0 noise N(0, I), t=1 data; x_t = t x1 + (1 - t) x0",
        "dtype": str(dtype).replace("torch.", ""),
        "data": data or {},
        "training": training or {},
        "ctflow_version": _version(),
    }
    tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
               for k, v in module.state_dict().items()}
    return write_checkpoint(tensors, meta, path_stem)


def load_prior_file(path: PathLike, *, device=None, verify: bool = True):
    """Load a prior from a checkpoint path (stem, ``.json`` or ``.safetensors``).

    Returns a :class:`~ctflow.priors.base.FlowPrior` in eval mode (float32 weights; the EMA
    weights of a training checkpoint) with ``image_size``, ``channels``, ``scale``, ``shift``,
    ``hu_window`` and ``config`` (the JSON description) set. Raises ``FileNotFoundError`` for
    missing files and :class:`CheckpointError` (a ``ValueError``) for corrupt, truncated or
    mismatched ones, naming the file.
    """
    from ctflow.priors.base import FlowPrior

    json_path, _ = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(path, verify=verify)
    if meta.get("kind") in ("latent", "latent-codec"):   # latent priors: ctflow.priors.latent
        from ctflow.priors.latent import latent_prior_from_checkpoint
        latent = latent_prior_from_checkpoint(tensors, meta, json_path)
        if device is not None:
            latent.to(device=device)
        return latent.eval()
    if meta["format"] == TRAIN_FORMAT:
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        prior_meta = dict(meta.get("prior", {}))
        model_config = meta.get("model")
    else:
        state = tensors
        prior_meta = meta
        model_config = meta.get("model")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{json_path}: no architecture config ('model') recorded")
    for key in ("image_size",):
        if key not in prior_meta:
            raise CheckpointError(f"{json_path}: missing field {key!r}")
    try:
        model = build_velocity(model_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{json_path}: invalid architecture config ({e})") from None
    _check_state(model, state, json_path.with_name(meta.get("weights", json_path.stem)))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    channels = int(prior_meta.get("channels", model_config.get("channels", 1)))
    if channels != model_config.get("channels", channels):
        raise CheckpointError(f"{json_path}: channels={channels} but the model config has "
                              f"{model_config.get('channels')}")
    prior = FlowPrior(model, image_size=int(prior_meta["image_size"]), channels=channels,
                      scale=float(prior_meta.get("scale", 2.0)),
                      shift=float(prior_meta.get("shift", -1.0)),
                      hu_window=prior_meta.get("hu_window"),
                      name=str(meta.get("name", prior_meta.get("name", json_path.stem))),
                      config=meta)
    if device is not None:
        prior.to(device=device)
    return prior.eval()
