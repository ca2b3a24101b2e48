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

from pathlib import Path
from typing import Optional

import torch

from ctflow.priors.base import FlowPrior
from ctflow.priors.checkpoint_io import (FORMAT_VERSION, PRIOR_FORMAT, TRAIN_FORMAT,
                                         CheckpointError, PathLike, build_velocity,
                                         check_safetensors_file, check_state, ctflow_version,
                                         read_checkpoint, resolve_checkpoint, sha256_file,
                                         write_checkpoint)
from ctflow.priors.latent import latent_prior_from_checkpoint

__all__ = ["PRIOR_FORMAT", "TRAIN_FORMAT", "FORMAT_VERSION", "CheckpointError", "save_prior",
           "load_prior_file", "write_checkpoint", "read_checkpoint", "resolve_checkpoint",
           "sha256_file", "check_safetensors_file", "build_velocity"]


def save_prior(prior_or_model, path_stem: PathLike, *, model_config: Optional[dict] = None,
               image_size: Optional[int] = None, channels: Optional[int] = None,
               scale: Optional[float] = None, shift: Optional[float] = None,
               hu_window=None, name: Optional[str] = None, data: Optional[dict] = None,
               training: Optional[dict] = None, dtype: torch.dtype = torch.float32,
               size_agnostic: bool = False, size_multiple: Optional[int] = None,
               pixel_mm=None) -> Path:
    """Save a prior (a :class:`~ctflow.priors.base.FlowPrior` with a module velocity, or a
    bare velocity module) as ``<path_stem>.safetensors`` + ``<path_stem>.json``.

    Keyword values override those of the prior; for a bare module ``image_size`` is required
    unless ``size_agnostic=True`` (a fully convolutional velocity for any image side divisible
    by ``size_multiple``, trained at pixel sizes ``pixel_mm = (min, max)`` mm; ``channels``
    defaults to the model's, ``scale=2, shift=-1``). ``model_config`` defaults
    to ``module.config``. ``data`` describes the training data (sources, patient split),
    ``training`` the run (steps, final loss, command, wall time). Weights are stored in
    ``dtype`` (float32 or float16); loading converts back to float32. Returns the JSON path.
    """
    if isinstance(prior_or_model, FlowPrior):
        prior = prior_or_model
        module = prior.velocity
        image_size = prior.image_size if image_size is None else image_size
        size_multiple = prior.size_multiple if size_multiple is None else size_multiple
        pixel_mm = prior.pixel_mm if pixel_mm is None else pixel_mm
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
    if size_agnostic or (image_size is None and isinstance(prior_or_model, FlowPrior)):
        image_size = None
        size_multiple = int(size_multiple or getattr(module, "factor", 1))
    elif image_size is None:
        raise ValueError("save_prior: image_size is required for a bare module (or pass "
                         "size_agnostic=True)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    channels = int(channels if channels is not None else model_config.get("channels", 1))
    meta = {
        "format": PRIOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or Path(path_stem).name,
        "model": model_config,
        "image_size": None if image_size is None else int(image_size),
        "channels": channels,
        "scale": float(2.0 if scale is None else scale),
        "shift": float(-1.0 if shift is None else shift),
        "hu_window": list(hu_window) if hu_window is not None else None,
        "time_convention": "t=0 noise N(0, I), t=1 data; x_t = t x1 + (1 - t) x0",
        "dtype": str(dtype).replace("torch.", ""),
        "data": data or {},
        "training": training or {},
        "ctflow_version": ctflow_version(),
    }
    if image_size is None:
        meta["size_multiple"] = int(size_multiple or 1)
        meta["pixel_mm"] = None if pixel_mm is None else [float(v) for v in pixel_mm]
    tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
               for k, v in module.state_dict().items()}
    return write_checkpoint(tensors, meta, path_stem)


def load_prior_file(path: PathLike, *, device=None, verify: bool = True,
                    allow_unverified: bool = False):
    """Load a prior from a checkpoint path (stem, ``.json`` or ``.safetensors``).

    Returns a :class:`~ctflow.priors.base.FlowPrior` in eval mode (float32 weights; the EMA
    weights of a training checkpoint) with ``image_size``, ``channels``, ``scale``, ``shift``,
    ``hu_window`` and ``config`` (the JSON description) set. Raises ``FileNotFoundError`` for
    missing files and :class:`CheckpointError` (a ``ValueError``) for corrupt, truncated or
    mismatched ones, naming the file. The description is checked before anything is built
    (:mod:`ctflow.priors.checkpoint_checks`); one without a ``sha256`` of its weights is
    refused unless ``allow_unverified=True``.
    """
    json_path, _ = resolve_checkpoint(path)
    tensors, meta = read_checkpoint(path, verify=verify, allow_unverified=allow_unverified)
    if meta.get("kind") in ("latent", "latent-codec"):   # latent priors: ctflow.priors.latent
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
    check_state(model, state, json_path.with_name(meta.get("weights", json_path.stem)))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    channels = int(prior_meta.get("channels", model_config.get("channels", 1)))
    if channels != model_config.get("channels", channels):
        raise CheckpointError(f"{json_path}: channels={channels} but the model config has "
                              f"{model_config.get('channels')}")
    size = None if prior_meta.get("size_agnostic") else prior_meta["image_size"]
    pixel_mm = prior_meta.get("pixel_mm")
    prior = FlowPrior(model, image_size=None if size is None else int(size), channels=channels,
                      size_multiple=int(prior_meta.get("size_multiple", 1)),
                      pixel_mm=None if pixel_mm is None else tuple(pixel_mm),
                      scale=float(prior_meta.get("scale", 2.0)),
                      shift=float(prior_meta.get("shift", -1.0)),
                      hu_window=prior_meta.get("hu_window"),
                      name=str(meta.get("name", prior_meta.get("name", json_path.stem))),
                      config=meta)
    if device is not None:
        prior.to(device=device)
    return prior.eval()
