"""Finding and loading priors: bundled ones by name, any checkpoint by path.

Bundled priors live in ``ctflow/priors/bundled/`` as ``<name>.safetensors`` + ``<name>.json``
(see :mod:`ctflow.priors.checkpoint` for the format) and load with no network access.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Union

from ctflow.priors.checkpoint import load_prior_file, resolve_checkpoint

__all__ = ["list_priors", "load_prior", "bundled_dir", "bundled_path"]


def bundled_dir() -> Path:
    """The folder holding the bundled priors."""
    return Path(__file__).resolve().parent / "bundled"


def list_priors(*, details: bool = False) -> Union[List[str], List[dict]]:
    """Names of the bundled priors (sorted): every ``<name>.json`` in :func:`bundled_dir`
    that has a ``<name>.safetensors`` beside it.

    ``details=True`` gives one dict per prior instead, read from its JSON (no weights are
    loaded): ``name``, ``kind`` (``"pixel"`` or ``"latent"``), ``image_size`` (``None``: any
    side divisible by ``size_multiple``), ``size_multiple``, ``pixel_mm`` (the training
    images' pixel sizes in mm, where recorded), ``hu_window`` and ``parameters``."""
    d = bundled_dir()
    if not d.is_dir():
        return []
    names = sorted(p.stem for p in d.glob("*.json") if p.with_suffix(".safetensors").is_file())
    if not details:
        return names
    return [_describe(d / f"{n}.json") for n in names]


def _describe(path: Path) -> dict:
    meta = json.loads(path.read_text())
    size = meta.get("image_size")
    return {"name": path.stem,
            "kind": "latent" if meta.get("kind") in ("latent", "latent-codec") else "pixel",
            "image_size": size, "size_multiple": meta.get("size_multiple", 1),
            "pixel_mm": meta.get("pixel_mm"), "hu_window": meta.get("hu_window"),
            "parameters": (meta.get("training") or {}).get("parameters")}


def bundled_path(name: str) -> Path:
    """The JSON path of the bundled prior ``name`` (``ValueError`` listing the names if
    there is none)."""
    names = list_priors()
    if name not in names:
        raise ValueError(f"no bundled prior named {name!r}; bundled priors: {names}")
    return bundled_dir() / f"{name}.json"


def _is_plain_name(s: str) -> bool:
    return not (os.sep in s or "/" in s or s.endswith((".json", ".safetensors")))


def _is_diffusers_folder(s: str) -> bool:
    p = Path(s)
    return p.is_dir() and (p / "transformer").is_dir() and (p / "vae").is_dir()


def load_prior(name_or_path: Union[str, os.PathLike], *, device=None, verify: bool = True,
               allow_unverified: bool = False):
    """Load a prior: a bundled name (see :func:`list_priors`) or a checkpoint path (stem,
    ``.json`` or ``.safetensors``; a training checkpoint gives its EMA weights), or a local
    diffusers Stable Diffusion 3 folder (``transformer/`` and ``vae/``), loaded as a latent
    prior by :func:`ctflow.priors.from_diffusers` with its defaults (unconditional zero
    embeddings, grey images).

    Returns a :class:`~ctflow.priors.base.FlowPrior` in eval mode with ``image_size``,
    ``channels``, ``scale``/``shift`` and ``hu_window`` set. Never unpickles. Raises
    ``ValueError`` for an unknown name, ``FileNotFoundError`` for a missing file and
    :class:`~ctflow.priors.checkpoint.CheckpointError` (a ``ValueError``) for a corrupt,
    truncated or mismatched one; messages name the file. Every value of the description that
    sizes or scales the prior is checked before the network is built; the weights' SHA-256
    recorded in the description is verified (``verify=False`` skips the hashing), and a
    checkpoint that records none is refused unless ``allow_unverified=True``.
    """
    s = os.fspath(name_or_path)
    if _is_diffusers_folder(s):    # a local diffusers SD3 folder: ctflow.priors.from_diffusers
        from ctflow.priors.diffusers_adapter import from_diffusers
        return from_diffusers(s, device=device)
    if not isinstance(name_or_path, os.PathLike) and _is_plain_name(s):
        # a plain name: a bundled prior first, else a checkpoint stem in the working folder
        if s in list_priors() or not Path(s + ".json").is_file():
            return load_prior_file(bundled_path(s), device=device, verify=verify,
                                   allow_unverified=allow_unverified)
    json_path, _ = resolve_checkpoint(s)
    if not json_path.is_file():
        raise FileNotFoundError(f"prior not found: {json_path} (bundled priors: "
                                f"{list_priors()})")
    return load_prior_file(json_path, device=device, verify=verify,
                           allow_unverified=allow_unverified)
