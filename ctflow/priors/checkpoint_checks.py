"""Checks on a checkpoint's JSON description before anything is built from it.

A description is data from a file (possibly someone else's), so every value that sizes a
network or enters the arithmetic is checked first -- types, bounds, finiteness, nesting
depth, the file's size -- and an architecture whose parameter count cannot match the weights
file is refused before the network is allocated. Every error is a
:class:`CheckpointError` (a ``ValueError``) naming the file and the value.

* :func:`read_json_file` -- a JSON file of bounded size and nesting depth;
* :func:`check_description` -- the fields of a prior / training checkpoint description;
* :func:`check_architecture` -- a velocity (UNet) or autoencoder config, and its parameter
  count against the weights' (from the safetensors header, no tensor read).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["CheckpointError", "MAX_JSON_BYTES", "MAX_DEPTH", "MAX_IMAGE_SIZE", "read_json_file", "parse_json",
           "check_description", "check_architecture", "json_depth"]

#: The largest description accepted (bytes): real ones are a few kB.
MAX_JSON_BYTES = 16 << 20
#: The deepest nesting accepted in a description or a safetensors header.
MAX_DEPTH = 32
#: The largest ``image_size`` (pixels per side) a prior may declare.
MAX_IMAGE_SIZE = 8192

# Integer fields of a network config: (lowest, highest) accepted.
_INT_BOUNDS = {
    "channels": (1, 64), "latent_channels": (1, 256), "base": (1, 2048),
    "num_res_blocks": (1, 64), "num_heads": (1, 256), "groups": (1, 2048),
    "image_size": (1, MAX_IMAGE_SIZE), "size_multiple": (1, 4096),
}


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, implausible or does not match its
    description (re-exported by :mod:`ctflow.priors.checkpoint_io`)."""


def _fail(where: Path, msg: str):
    raise CheckpointError(f"{where}: {msg}") from None


def json_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value: the number of levels of objects and arrays
    (stops counting above ``limit``)."""
    depth, level = 0, [obj]
    while level:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        depth += 1
        if depth > limit:
            break
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def parse_json(text: str, where: Path) -> Any:
    """``json.loads(text)`` with a bounded nesting depth; errors name ``where``."""
    try:
        obj = json.loads(text)
    except RecursionError:
        _fail(where, f"JSON nested too deeply (more than {MAX_DEPTH} levels are refused)")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(where, f"not valid JSON ({e})")
    if json_depth(obj) > MAX_DEPTH:
        _fail(where, f"JSON nested more than {MAX_DEPTH} levels deep; refused")
    return obj


def read_json_file(path: Path) -> Any:
    """Parse the JSON file ``path`` (at most :data:`MAX_JSON_BYTES`, nesting depth at most
    :data:`MAX_DEPTH`)."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        _fail(path, f"description of {size} bytes is larger than {MAX_JSON_BYTES} bytes; "
                    "refused")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        _fail(path, f"not valid UTF-8 JSON ({e})")
    return parse_json(text, path)


def _int(cfg: Mapping, key: str, where: Path, what: str) -> Optional[int]:
    if key not in cfg or cfg[key] is None:
        return None
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (isinstance(v, float) and (not math.isfinite(v) or v != int(v))):
        _fail(where, f"{what}{key} must be an integer, got {v!r}")
    lo, hi = _INT_BOUNDS.get(key, (0, 1 << 20))
    if not lo <= int(v) <= hi:
        _fail(where, f"{what}{key} = {v!r} is outside [{lo}, {hi}]")
    return int(v)


def _finite(meta: Mapping, key: str, where: Path, *, nonzero: bool = False) -> None:
    if key not in meta or meta[key] is None:
        return
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        _fail(where, f"{key} must be a finite number, got {v!r}")
    if nonzero and float(v) == 0:
        _fail(where, f"{key} must not be 0")


def _int_list(cfg: Mapping, key: str, where: Path, what: str, lo: int, hi: int,
              max_len: int = 16) -> list:
    v = cfg.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > max_len or not all(
            isinstance(m, int) and not isinstance(m, bool) and lo <= m <= hi for m in v):
        _fail(where, f"{what}{key} must be a list of at most {max_len} integers in "
                     f"[{lo}, {hi}], got {v!r}"[:300])
    return list(v)


def check_architecture(cfg: Any, where: Path, *, weights_numel: Optional[int] = None,
                       what: str = "model.") -> None:
    """Types and bounds of a network config; with ``weights_numel`` also that the config's
    smallest possible parameter count does not exceed the weights' (a config that would build
    a far larger network than the file holds is refused before it is built)."""
    if not isinstance(cfg, dict):
        _fail(where, f"{what.rstrip('.')} must be a JSON object, got {type(cfg).__name__}")
    for key in _INT_BOUNDS:
        _int(cfg, key, where, what)
    mults = _int_list(cfg, "channel_mults", where, what, 1, 64)
    _int_list(cfg, "attention_levels", where, what, 0, 15)
    if "dropout" in cfg and cfg["dropout"] is not None:
        d = cfg["dropout"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            _fail(where, f"{what}dropout must be a number in [0, 1), got {d!r}")
    for key, sub in cfg.items():
        if isinstance(sub, dict):       # nested configs (a latent prior's parts)
            check_architecture(sub, where, what=f"{what}{key}.")
    if weights_numel is None:
        return
    base = int(cfg.get("base") or 0)
    blocks = int(cfg.get("num_res_blocks") or 0)
    # Two 3x3 convolutions of width base*m per residual block: a lower bound on the count.
    lower = sum(blocks * 2 * 9 * (base * m) ** 2 for m in mults)
    if lower > 2 * weights_numel + 100_000:
        _fail(where, f"{what.rstrip('.')} config (base={base}, num_res_blocks={blocks}, "
                     f"channel_mults={mults}) implies at least {lower:,} parameters but the "
                     f"weights hold {weights_numel:,}; refused before building it")


def check_description(meta: Dict[str, Any], where: Path, *,
                      weights_numel: Optional[int] = None) -> None:
    """The fields of a checkpoint description that size or scale a prior: ``image_size``,
    ``channels``, ``size_multiple`` (integers in bounds), ``scale`` (finite, non-zero),
    ``shift`` (finite), ``hu_window`` (two finite numbers, lo < hi), ``pixel_mm``, ``model``
    (:func:`check_architecture`), also inside a training checkpoint's ``prior``."""
    for part, what in ((meta, ""), (meta.get("prior"), "prior.")):
        if part is None:
            continue
        if not isinstance(part, dict):
            _fail(where, f"{what.rstrip('.')} must be a JSON object")
        for key in ("image_size", "channels", "size_multiple"):
            _int(part, key, where, what)
        _finite(part, "scale", where, nonzero=True)
        _finite(part, "shift", where)
        for key in ("hu_window", "pixel_mm"):
            v = part.get(key)
            if v is None:
                continue
            ok = isinstance(v, list) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool)
                and math.isfinite(x) for x in v) and v[0] <= v[1]
            if not ok or (key == "hu_window" and v[0] == v[1]) or \
                    (key == "pixel_mm" and v[0] <= 0):
                _fail(where, f"{what}{key} must be two finite numbers lo < hi, got {v!r}"[:300])
    if "model" in meta:
        check_architecture(meta["model"], where, weights_numel=weights_numel)
    if isinstance(meta.get("autoencoder"), dict):
        check_architecture(meta["autoencoder"], where, what="autoencoder.")
