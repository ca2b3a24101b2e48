"""A compact, resumable training state that can live in a git repository.

A full training checkpoint (:func:`ctflow.training.prior.train_prior`) holds the model, its
EMA, the AdamW moments and the RNG states in float32: four copies of the weights. To carry a
long training run from one machine to the next through the repository, :func:`export_state`
keeps what cannot be rebuilt — the model and EMA weights, in float16, the RNG states, the
step, the hyper-parameters and the loss log — and drops the optimiser moments (rebuilt by
AdamW within a few hundred steps; the first step after a resume is a fresh Adam step). That is
half the size of the float32 weights plus EMA, e.g. 16.6 MB for a 4.2 M-parameter U-Net.

:func:`import_state` turns such a state back into a full training checkpoint in a run folder,
so that rerunning the training command resumes from it (same step, same data and noise
streams; the AdamW state is fresh).

Files: ``<stem>.safetensors`` + ``<stem>.json`` (safetensors + JSON, SHA-256 checked, no
pickle) and ``<stem>.loss.jsonl`` (the loss log up to the state's step).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from ctflow.data.atomic import atomic_write_bytes
from ctflow.priors.checkpoint import TRAIN_FORMAT, CheckpointError, read_checkpoint, write_checkpoint
from ctflow.training.portable import portable

__all__ = ["STATE_FORMAT", "export_state", "import_state"]

#: Marker in a compact state's JSON (its ``format`` is the training-checkpoint format, so the
#: checkpoint reader verifies it like any other; a run folder never holds one).
STATE_FORMAT = "compact-float16"
_CKPT = "ckpt-{:08d}"


def _latest(run_dir: Path) -> Path:
    steps = []
    for f in run_dir.glob("ckpt-*.json"):
        try:
            steps.append((int(f.stem.split("-")[1]), f))
        except (IndexError, ValueError):
            continue
    for _, f in sorted(steps, reverse=True):
        try:
            read_checkpoint(f, verify=True)
        except (OSError, CheckpointError):
            continue
        return f
    raise FileNotFoundError(f"no valid training checkpoint (ckpt-*.json) in {run_dir}")


def _half(v: torch.Tensor, name: str) -> torch.Tensor:
    if not v.is_floating_point():
        return v
    h = v.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"{name} does not fit in float16 (|value| up to "
                         f"{float(v.abs().max()):.3g})")
    return h


def export_state(run_dir, stem, *, checkpoint: Optional[str] = None) -> Path:
    """Write the compact state of the newest valid checkpoint in ``run_dir`` (or of the
    checkpoint file ``checkpoint``) to ``<stem>.safetensors/.json/.loss.jsonl``; returns the
    JSON path. Existing files of ``stem`` are replaced atomically (the latest state only)."""
    run_dir = Path(run_dir)
    src = Path(checkpoint) if checkpoint else _latest(run_dir)
    tensors, meta = read_checkpoint(src)
    if meta.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{src}: not a training checkpoint")
    keep = {k: _half(v, k) for k, v in tensors.items()
            if k.startswith(("model.", "ema.", "rng."))}
    out = {k: v for k, v in meta.items()
           if k not in ("format", "weights", "sha256", "ctflow_version", "optimizer")}
    # no machine-specific path goes into the repository: the run folder becomes runs/<name>
    out["commands"] = portable([str(c) for c in out.get("commands", [])], run_dir)
    out.update(format=TRAIN_FORMAT, compact_state=STATE_FORMAT, source_checkpoint=src.name,
               optimizer_param_groups=meta["optimizer"]["param_groups"],
               dropped=["AdamW moments (rebuilt after resume)"])
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir / "loss.jsonl"
    lines = []
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                if json.loads(line).get("step", math.inf) <= meta["step"]:
                    lines.append(line)
            except json.JSONDecodeError:
                break
    atomic_write_bytes(stem.with_name(stem.name + ".loss.jsonl"),
                       "".join(x + "\n" for x in lines).encode())
    return write_checkpoint(keep, out, stem)


def import_state(stem, run_dir) -> Path:
    """Write the compact state ``stem`` as a full training checkpoint into ``run_dir`` (model
    and EMA back in float32, a fresh AdamW state, the RNG states and loss log as saved), so
    that the training command resumes from it. Refuses a ``run_dir`` that already holds a
    checkpoint at or beyond the state's step. Returns the checkpoint's JSON path."""
    tensors, meta = read_checkpoint(stem)
    if meta.get("format") != TRAIN_FORMAT or meta.get("compact_state") != STATE_FORMAT:
        raise CheckpointError(f"{stem}: not a compact training state (export_state)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    for f in run_dir.glob("ckpt-*.json"):
        try:
            if int(f.stem.split("-")[1]) >= step:
                raise FileExistsError(f"{run_dir} already has {f.name} (step >= {step}); "
                                      "resume from it instead")
        except (IndexError, ValueError):
            continue
    full = {k: (v.to(torch.float32) if v.is_floating_point() else v)
            for k, v in tensors.items()}
    out = {k: v for k, v in meta.items()
           if k not in ("format", "weights", "sha256", "ctflow_version", "compact_state",
                        "optimizer_param_groups", "dropped", "source_checkpoint")}
    out.update(format=TRAIN_FORMAT,
               optimizer={"param_groups": meta["optimizer_param_groups"], "scalars": {}},
               resumed_from_state=Path(stem).name)
    src_log = Path(str(stem) + ".loss.jsonl")
    if src_log.is_file():
        atomic_write_bytes(run_dir / "loss.jsonl", src_log.read_bytes())
    return write_checkpoint(full, out, run_dir / _CKPT.format(step))
