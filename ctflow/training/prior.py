r"""Conditional flow-matching training of a velocity model, with EMA, checkpoints and resume.

Objective (rectified flow / OT-CFM, :math:`t = 0` noise, :math:`t = 1` data): with data
:math:`x_1` (model space, :math:`x_1 = a\,x + b` for public images :math:`x \in [0,1]`),
noise :math:`x_0 \sim N(0, I)` and :math:`x_t = t x_1 + (1 - t) x_0`,

.. math::

    L(\theta) = E_{t, (x_0, x_1) \sim \pi}\,\|v_\theta(x_t, t) - (x_1 - x_0)\|^2 .

Time sampling: ``"uniform"`` :math:`t \sim U(0, 1)` (default) or ``"logit_normal"``
:math:`t = \sigma(z),\ z \sim N(0, 1)`, which puts more weight on intermediate times.

Couplings :math:`\pi` of a batch of noise and data:

* ``"independent"`` — :math:`x_0` and :math:`x_1` drawn independently;
* ``"ot"`` — minibatch optimal transport: the noise batch is permuted by the exact solution
  of the assignment problem :math:`\min_\sigma \sum_i \|x_0^{\sigma(i)} - x_1^i\|^2`
  (``scipy.optimize.linear_sum_assignment``), which makes the learned paths straighter and
  few-step sampling more accurate.

Optimisation: AdamW, linear learning-rate warm-up over ``warmup_steps`` then constant or
cosine decay (to ``min_lr_ratio * lr``), gradient clipping by global norm, and an exponential
moving average of the weights :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\theta`
with :math:`d = \min(d_{\max}, (1 + n)/(10 + n))` at step :math:`n` (warm-up) — the EMA
weights are the prior.

Checkpoints (every ``checkpoint_every`` steps and at the end) hold the model, EMA, optimizer
state, step, the data/noise generator state and the global torch RNG state, as safetensors +
JSON (:mod:`ctflow.priors.checkpoint`; no pickle). ``resume=True`` continues bit-for-bit from
the newest valid checkpoint in ``out_dir``. The loss log ``loss.jsonl`` holds one JSON line
per ``log_every`` steps (mean loss over the interval, lr, wall time).

Command line: ``python -m ctflow.training.prior dicom ...`` (train on DICOM), ``... bundle ...``
(export the EMA weights of the newest checkpoint as a prior); see :func:`train_main`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ctflow.priors.base import FlowPrior
from ctflow.priors.checkpoint import (TRAIN_FORMAT, CheckpointError, read_checkpoint, save_prior,
                                 write_checkpoint)
from ctflow.flow.unet import UNet

__all__ = ["train_prior", "TrainResult", "ot_couple", "sample_times", "flow_matching_loss",
           "EMA", "latest_checkpoint", "bundle_checkpoint", "train_main", "lr_at"]

COUPLINGS = ("independent", "ot")
TIME_SAMPLINGS = ("uniform", "logit_normal")


# ---------------------------------------------------------------------- pieces
def ot_couple(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Reorder the noise batch ``x0`` to the exact minibatch OT assignment with ``x1``
    (squared Euclidean cost); returns ``x0[perm]`` with ``perm`` minimising
    :math:`\\sum_i \\|x_0^{perm(i)} - x_1^i\\|^2`."""
    from scipy.optimize import linear_sum_assignment

    a = x0.reshape(x0.shape[0], -1).double()
    b = x1.reshape(x1.shape[0], -1).double()
    cost = torch.cdist(b, a).pow(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.as_tensor(cols[np.argsort(rows)], device=x0.device)
    return x0[perm]


def sample_times(n: int, generator: torch.Generator, kind: str = "uniform") -> torch.Tensor:
    """``n`` training times in ``[0, 1]`` (``"uniform"`` or ``"logit_normal"``)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {kind!r}")


def flow_matching_loss(model: Callable, x1: torch.Tensor, x0: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{mean}\\|v(x_t, t) - (x_1 - x_0)\\|^2`, :math:`x_t = t x_1 + (1-t) x_0`."""
    tb = t.to(x1).reshape(-1, *([1] * (x1.ndim - 1)))
    xt = tb * x1 + (1 - tb) * x0
    return (model(xt, t.to(x1)).float() - (x1 - x0)).pow(2).mean()


class EMA:
    """Exponential moving average of a module's floating-point state (parameters and
    buffers), with the warm-up :math:`d_n = \\min(d, (1 + n)/(10 + n))`."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "constant", min_lr_ratio: float = 0.1) -> float:
    """Learning rate at (0-based) ``step``: linear warm-up, then constant or cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")


# ---------------------------------------------------------------------- optimizer state
def _flatten_optimizer(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: Dict[int, dict] = {}
    for name, v in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = v
    for name, v in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------- checkpoints
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.json$")


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The JSON path of the newest checkpoint in ``out_dir`` that reads back intact
    (header, size and SHA-256 checked), or ``None``."""
    d = Path(out_dir)
    if not d.is_dir():
        return None
    found = sorted(((int(m.group(1)), f) for f in d.iterdir()
                    if (m := _CKPT_RE.match(f.name))), reverse=True)
    for _, f in found:
        try:
            read_checkpoint(f, verify=True)
        except (OSError, CheckpointError):
            continue
        return f
    return None


def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().clone().to(torch.uint8)


def append_log(log_path: Path, losses: List[dict], rec: dict) -> None:
    """Append one loss record to the in-memory list and to ``loss.jsonl``."""
    losses.append(rec)
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def needs_final_checkpoint(path: Optional[Path], step: int, stopped: bool) -> bool:
    """Whether the run ends without a checkpoint of its last step (or was stopped)."""
    return path is None or int(json.loads(Path(path).read_text())["step"]) != step or stopped


def training_state(model: torch.nn.Module, ema: "EMA", opt: torch.optim.Optimizer,
                   gen: torch.Generator):
    """The tensors of a resumable training checkpoint (model, EMA, optimiser, both RNG
    states) and the optimiser's layout for its JSON: ``(tensors, optimizer_meta)``."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    ot, ometa = _flatten_optimizer(opt)
    tensors.update(ot)
    tensors["rng.train"] = _rng_tensor(gen.get_state())
    tensors["rng.torch"] = _rng_tensor(torch.get_rng_state())
    return tensors, ometa


def restore_training_state(tensors: Dict[str, torch.Tensor], meta: dict,
                           model: torch.nn.Module, ema: "EMA", opt: torch.optim.Optimizer,
                           gen: torch.Generator, log_path: Path):
    """Load what :func:`training_state` saved, cut the loss log back to the checkpoint's step;
    returns ``(step, elapsed_seconds, commands)``."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.shadow = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
    _unflatten_optimizer(opt, tensors, meta["optimizer"])
    gen.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    step = int(meta["step"])
    logged = [r for r in _read_log(log_path) if r.get("step", 0) <= step]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in logged))
    return step, float(meta.get("elapsed_seconds", 0.0)), list(meta.get("commands", []))


@dataclass
class LoopEnd:
    """Where :func:`training_loop` stopped."""

    step: int
    last_loss: Optional[float]
    seconds: float
    checkpoint: Optional[Path]


def training_loop(*, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: "EMA",
                  loss_step: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
                  lr_of_step: Callable[[int], float], step: int, steps: int, elapsed: float,
                  grad_clip: float, log_every: int, checkpoint_every: int,
                  save: Callable[[int, Optional[float], float], Path], log_path: Path,
                  losses: List[dict], checkpoint: Optional[Path],
                  stop: Optional[Callable[[], bool]], progress: bool, what: str) -> LoopEnd:
    """The optimisation loop of every trainer (flow prior, autoencoder), from ``step`` to
    ``steps``.

    Per step: the learning rate ``lr_of_step(step)``, ``loss, extras = loss_step()`` (the
    trainer draws its batch and noise there, from its own generator), backward, gradient
    clipping at ``grad_clip`` (0: none), the optimiser and EMA updates. Every ``log_every``
    steps (and at the last) the mean loss and the means of ``extras`` since the last record go
    to ``loss.jsonl`` (:func:`append_log`); every ``checkpoint_every`` steps
    ``save(step, last_loss, elapsed_seconds)`` writes a checkpoint, and at the end one more if
    the last step has none (:func:`needs_final_checkpoint`). ``stop()`` returning true ends the
    loop early (SIGINT/SIGTERM in the CLIs); a non-finite loss raises ``FloatingPointError``.
    ``elapsed`` counts training time across resumed runs; checkpoint writing is not counted.
    """
    last_loss = losses[-1]["loss"] if losses else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=min(step, steps), desc=f"train {what}",
                   dynamic_ncols=True)
    acc, acc_extra, acc_n = 0.0, {}, 0
    t_mark = time.perf_counter()
    path, stopped = checkpoint, False
    while step < steps:
        if stop is not None and stop():
            stopped = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_of_step(step)
        loss, extras = loss_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{what} loss became {lv} at step {step}")
        acc += lv
        for k, v in extras.items():
            acc_extra[k] = acc_extra.get(k, 0.0) + float(v.detach())
        acc_n += 1
        if step % log_every == 0 or step == steps:
            now = time.perf_counter()
            elapsed += now - t_mark
            t_mark = now
            rec = {"step": step, "loss": acc / acc_n,
                   **{k: v / acc_n for k, v in acc_extra.items()},
                   "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed, 3)}
            append_log(log_path, losses, rec)
            last_loss = rec["loss"]
            acc, acc_extra, acc_n = 0.0, {}, 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}")
        if step % checkpoint_every == 0 and step != steps:
            elapsed += time.perf_counter() - t_mark
            t_mark = time.perf_counter()
            path = save(step, last_loss, elapsed)
    elapsed += time.perf_counter() - t_mark
    if bar is not None:
        bar.close()
    if needs_final_checkpoint(path, step, stopped):
        path = save(step, last_loss, elapsed)
    return LoopEnd(step=step, last_loss=last_loss, seconds=elapsed, checkpoint=path)


@dataclass
class TrainResult:
    """What :func:`train_prior` returns."""

    prior: FlowPrior
    step: int
    final_loss: Optional[float]
    seconds: float
    out_dir: str
    checkpoint: Optional[str]
    losses: List[dict] = field(default_factory=list)


def _read_log(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def train_prior(dataset, *, out_dir, steps: int, batch_size: int = 16, lr: float = 2e-4,
                model: Optional[torch.nn.Module] = None, model_config: Optional[dict] = None,
                weight_decay: float = 0.0, betas=(0.9, 0.999), warmup_steps: int = 500,
                lr_schedule: str = "constant", min_lr_ratio: float = 0.1,
                ema_decay: float = 0.999, ema_warmup: bool = True, grad_clip: float = 1.0,
                coupling: str = "ot", time_sampling: str = "uniform", seed: int = 0,
                checkpoint_every: int = 200, keep_last: int = 2, keep_every: Optional[int] = None,
                log_every: int = 10, resume: bool = True, progress: bool = False,
                scale: float = 2.0, shift: float = -1.0, hu_window=None, name: str = "prior",
                data_description: Optional[dict] = None, command: Optional[str] = None,
                device=None, num_threads: Optional[int] = None, channels_last: bool = False,
                autocast: Optional[str] = None,
                stop: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train a flow-matching prior on ``dataset`` (see the module docstring for the maths).

    Args:
        dataset: an object with ``sample(batch_size, generator) -> (B, C, S, S)`` images in
            ``[0, 1]`` (the datasets of :mod:`ctflow.training.datasets`), or a tensor
            ``(N, C, S, S)`` in ``[0, 1]``.
        out_dir: checkpoints ``ckpt-<step>.safetensors/.json`` and ``loss.jsonl`` go here.
        steps: total optimisation steps (a resumed run continues up to ``steps``).
        model / model_config: the velocity network (default ``UNet`` sized for the data);
            on resume the checkpoint's config must equal the given one.
        coupling: ``"ot"`` or ``"independent"``. time_sampling: ``"uniform"`` or
            ``"logit_normal"``.
        checkpoint_every: steps between checkpoints (also written at the end);
            ``keep_last`` newest are kept, plus every multiple of ``keep_every``.
        resume: continue from the newest valid checkpoint in ``out_dir`` if there is one.
        scale, shift: model-space normalisation :math:`x_m = a x + b`; hu_window, name,
            data_description, command: recorded in the checkpoints and the prior.
        stop: optional callable polled every step; when it returns True the run writes a
            checkpoint and returns early (used for SIGTERM in the command line).
        channels_last: run the network in channels-last memory format (about 20 % faster
            convolutions on CPUs; checkpoints are the same).
        autocast: ``"bf16"`` runs the network's forward and backward under bfloat16
            autocast (weights, optimiser and loss stay float32); ``None``: float32.

    Returns:
        :class:`TrainResult` with the EMA prior (eval mode), the step reached, the last
        logged loss, total wall time (across resumed runs) and the loss log.
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    if autocast not in (None, "bf16"):
        raise ValueError(f"autocast must be None or 'bf16', got {autocast!r}")
    if steps < 0 or batch_size < 1 or checkpoint_every < 1 or log_every < 1:
        raise ValueError("steps >= 0, batch_size >= 1, checkpoint_every >= 1 and "
                         f"log_every >= 1 required; got steps={steps}, batch_size={batch_size}, "
                         f"checkpoint_every={checkpoint_every}, log_every={log_every}")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    device = torch.device(device or "cpu")
    if isinstance(dataset, torch.Tensor):
        from ctflow.training.datasets import ImageTensorDataset
        dataset = ImageTensorDataset(dataset)
    if not hasattr(dataset, "sample"):
        raise ValueError("dataset must offer sample(batch_size, generator) or be a tensor")
    image_size = int(dataset.image_size)
    probe = dataset.sample(1, torch.Generator().manual_seed(0))
    channels = int(probe.shape[1])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if model is None:
        model = (UNet.from_config(model_config) if model_config is not None
                 else UNet(channels=channels, image_size=image_size))
    cfg = dict(getattr(model, "config", None) or model_config or {})
    if not cfg:
        raise ValueError("the model needs a JSON .config (or pass model_config)")
    model.to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas),
                            weight_decay=weight_decay)
    ema = EMA(model, ema_decay, ema_warmup)
    gen = torch.Generator().manual_seed(int(seed))
    step, elapsed = 0, 0.0
    log_path = out / "loss.jsonl"

    hparams = dict(steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                   weight_decay=float(weight_decay), betas=list(betas),
                   warmup_steps=int(warmup_steps), lr_schedule=lr_schedule,
                   min_lr_ratio=float(min_lr_ratio), ema_decay=float(ema_decay),
                   ema_warmup=bool(ema_warmup), grad_clip=float(grad_clip), coupling=coupling,
                   time_sampling=time_sampling, seed=int(seed),
                   checkpoint_every=int(checkpoint_every), log_every=int(log_every),
                   autocast=autocast)
    prior_meta = {"name": name, "image_size": image_size, "channels": channels,
                  "scale": float(scale), "shift": float(shift),
                  "hu_window": list(hu_window) if hu_window is not None else None}
    data_desc = data_description or (dataset.describe() if hasattr(dataset, "describe") else {})

    ckpt = latest_checkpoint(out) if resume else None
    commands: List[str] = []
    if ckpt is not None:
        tensors, meta = read_checkpoint(ckpt)
        if meta.get("format") != TRAIN_FORMAT:
            raise CheckpointError(f"{ckpt}: not a training checkpoint")
        if meta["model"] != cfg:
            raise ValueError(f"{ckpt}: checkpoint model config {meta['model']} differs from "
                             f"the requested {cfg}; use another out_dir or resume=False")
        step, elapsed, commands = restore_training_state(tensors, meta, model, ema, opt, gen,
                                                         log_path)
        for g in opt.param_groups:  # hyper-parameters may change between runs
            g["weight_decay"] = float(weight_decay)
            g["betas"] = tuple(betas)
    elif log_path.exists():
        log_path.unlink()
    if command:
        commands.append(command)
    losses = _read_log(log_path)

    def save(step_now: int, last_loss: Optional[float], seconds: float) -> Path:
        tensors, ometa = training_state(model, ema, opt, gen)
        meta = {"format": TRAIN_FORMAT, "name": name, "step": int(step_now),
                "elapsed_seconds": float(seconds), "last_loss": last_loss, "model": cfg,
                "prior": prior_meta, "train": hparams, "data": data_desc,
                "commands": commands, "optimizer": ometa,
                "parameters": int(sum(p.numel() for p in model.parameters()))}
        path = write_checkpoint(tensors, meta, out / f"ckpt-{step_now:08d}")
        _prune(out, step_now, keep_last, keep_every)
        return path

    def loss_step():
        x1 = scale * dataset.sample(batch_size, gen).to(device) + shift
        x0 = torch.randn(x1.shape, generator=gen).to(device)
        if coupling == "ot":
            x0 = ot_couple(x0, x1)
        if channels_last:
            x1 = x1.contiguous(memory_format=fmt)
            x0 = x0.contiguous(memory_format=fmt)
        t = sample_times(batch_size, gen, time_sampling).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            return flow_matching_loss(model, x1, x0, t), {}

    end = training_loop(
        model=model, opt=opt, ema=ema, loss_step=loss_step,
        lr_of_step=lambda k: lr_at(k, lr=lr, warmup_steps=warmup_steps, total_steps=steps,
                                   schedule=lr_schedule, min_lr_ratio=min_lr_ratio),
        step=step, steps=steps, elapsed=elapsed, grad_clip=grad_clip, log_every=log_every,
        checkpoint_every=checkpoint_every, save=save, log_path=log_path, losses=losses,
        checkpoint=ckpt, stop=stop, progress=progress, what=name)
    step, last_loss, elapsed, path = end.step, end.last_loss, end.seconds, end.checkpoint

    ema_model = type(model).from_config(cfg) if hasattr(type(model), "from_config") else model
    ema_model.load_state_dict(ema.shadow)
    prior = FlowPrior(ema_model, image_size=image_size, channels=channels, scale=scale,
                      shift=shift, hu_window=hu_window, name=name,
                      config={"model": cfg, "train": hparams, "step": step}).eval()
    return TrainResult(prior=prior, step=step, final_loss=last_loss, seconds=elapsed,
                       out_dir=str(out), checkpoint=str(path) if path else None, losses=losses)


def _prune(out: Path, newest: int, keep_last: int, keep_every: Optional[int]) -> None:
    steps = sorted(int(m.group(1)) for f in out.iterdir() if (m := _CKPT_RE.match(f.name)))
    keep = set(steps[-max(1, keep_last):]) | {newest}
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep:
            for suf in (".safetensors", ".json"):
                p = out / f"ckpt-{s:08d}{suf}"
                if p.exists():
                    p.unlink()


# ---------------------------------------------------------------------- bundling
def bundle_checkpoint(run_dir, dest_stem, *, name: Optional[str] = None,
                      dtype: torch.dtype = torch.float32, extra: Optional[dict] = None) -> Path:
    """Export the EMA weights of the newest valid checkpoint in ``run_dir`` (or of the
    checkpoint file ``run_dir`` itself) as a prior ``<dest_stem>.safetensors/.json``,
    recording the data description, steps, last loss, wall time, commands and the loss
    curve (every logged point, thinned to at most 200). Returns the JSON path."""
    src = Path(run_dir)
    ckpt = latest_checkpoint(src) if src.is_dir() else src
    if ckpt is None:
        raise FileNotFoundError(f"no valid checkpoint (ckpt-*.json) in {src}")
    tensors, meta = read_checkpoint(ckpt)
    if meta.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{ckpt}: not a training checkpoint")
    model = UNet.from_config(meta["model"])
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    pm = meta["prior"]
    log = _read_log(Path(ckpt).parent / "loss.jsonl")
    log = [r for r in log if r["step"] <= meta["step"]]
    stride = max(1, math.ceil(len(log) / 200))
    curve = [[r["step"], round(r["loss"], 5)] for r in log[::stride]]
    if log and (not curve or curve[-1][0] != log[-1]["step"]):
        curve.append([log[-1]["step"], round(log[-1]["loss"], 5)])
    training = {"steps": meta["step"], "final_loss": meta.get("last_loss"),
                "wall_seconds": round(meta.get("elapsed_seconds", 0.0), 1),
                "hyperparameters": meta.get("train", {}), "commands": meta.get("commands", []),
                "parameters": meta.get("parameters"), "ema": True,
                "source_checkpoint": Path(ckpt).name, "loss_curve": curve}
    data = dict(meta.get("data", {}))
    if extra:
        data.update(extra)
    return save_prior(model, dest_stem, image_size=pm["image_size"], channels=pm["channels"],
                      scale=pm["scale"], shift=pm["shift"], hu_window=pm.get("hu_window"),
                      name=name or pm.get("name"), data=data, training=training, dtype=dtype)


# ---------------------------------------------------------------------- command line
#: The fixed patient split of the bundled CT prior (COVID-19-NY-SBU subject IDs).
TEST_PATIENTS = ("A058062", "A062055", "A067967", "A072894", "A098752")
VALIDATION_PATIENTS = ("A048383", "A056642")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctflow train",
                                description="Train a flow-matching prior, or bundle one.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--out", required=True, help="run directory (checkpoints, loss.jsonl)")
        q.add_argument("--steps", type=int, required=True)
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--lr", type=float, default=2e-4)
        q.add_argument("--warmup-steps", type=int, default=500)
        q.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
        q.add_argument("--weight-decay", type=float, default=0.0)
        q.add_argument("--ema-decay", type=float, default=0.999)
        q.add_argument("--grad-clip", type=float, default=1.0)
        q.add_argument("--coupling", choices=list(COUPLINGS), default="ot")
        q.add_argument("--time-sampling", choices=list(TIME_SAMPLINGS), default="uniform")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--checkpoint-every", type=int, default=200)
        q.add_argument("--keep-every", type=int, default=None)
        q.add_argument("--log-every", type=int, default=10)
        q.add_argument("--no-resume", action="store_true")
        q.add_argument("--progress", action="store_true")
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format (faster CPU convolutions)")
        q.add_argument("--name", default="prior")
        q.add_argument("--image-size", type=int, default=64)
        q.add_argument("--base", type=int, default=16, help="U-Net width")
        q.add_argument("--channel-mults", default="1,2,4,6")
        q.add_argument("--num-res-blocks", type=int, default=2)
        q.add_argument("--attention-levels", default="2")
        q.add_argument("--device", default=None)
        q.add_argument("--norm", choices=["group", "channel"], default="group",
                       help="normalisation (channel: per pixel, for size-agnostic priors)")
        q.add_argument("--no-mid-attention", action="store_true",
                       help="no self-attention in the middle block")
        q.add_argument("--autocast", choices=["bf16"], default=None,
                       help="bfloat16 autocast for the network")

    d = sub.add_parser("dicom", help="train on CT slices from DICOM files/folders")
    d.add_argument("paths", nargs="+", help="DICOM folders or files")
    d.add_argument("--nifti", nargs="*", default=[], help="NIfTI volumes (axial slices added)")
    d.add_argument("--nifti-step", type=int, default=2)
    d.add_argument("--exclude-patients", default="",
                   help="comma-separated patient IDs never to train on (held-out split)")
    d.add_argument("--hu-window", default="-1024,1024")
    d.add_argument("--scale-range", default="0.85,1.0")
    d.add_argument("--no-augment", action="store_true")
    common(d)

    pt = sub.add_parser("patches", help="train a size-agnostic prior on patches of the "
                        "full-resolution training split")
    pt.add_argument("root", help="local copy of the CT source folders (ctflow.data.splits)")
    pt.add_argument("--split", default="train")
    pt.add_argument("--hu-window", default="-1024,2000")
    pt.add_argument("--pixel-mm", default="0.6,2.0", help="patch pixel sizes in mm (min,max)")
    pt.add_argument("--rotate-deg", type=float, default=10.0)
    pt.add_argument("--nifti-step", type=int, default=2)
    common(pt)

    e = sub.add_parser("ellipses", help="train on random ellipse phantoms")
    e.add_argument("--count", type=int, default=1024)
    common(e)

    m = sub.add_parser("medmnist", help="train on a local MedMNIST .npz file")
    m.add_argument("npz", help="<flag>_<size>.npz (or <flag>.npz for size 28), e.g. "
                               "organamnist_64.npz")
    m.add_argument("--split", default="train")
    common(m)

    b = sub.add_parser("bundle", help="export the EMA weights of a run as a prior")
    b.add_argument("run", help="run directory or ckpt-*.json")
    b.add_argument("--dest", default=None,
                   help="output stem (default: ctflow/priors/bundled/<name>)")
    b.add_argument("--name", required=True)
    b.add_argument("--float16", action="store_true")
    return p


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v.strip() != "")


def _floats(s: str) -> tuple:
    return tuple(float(v) for v in s.split(","))


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry (``ctflow train ...``): subcommands ``dicom``, ``ellipses``,
    ``medmnist`` and ``bundle``. SIGTERM/SIGINT write a checkpoint before exiting; rerunning
    the same command resumes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.cmd == "bundle":
        dest = args.dest or str(Path(__file__).resolve().parents[1] / "priors" / "bundled"
                                / args.name)
        path = bundle_checkpoint(args.run, dest, name=args.name,
                                 dtype=torch.float16 if args.float16 else torch.float32)
        print(f"bundled {args.run} -> {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from ctflow.training import datasets as D

    hu_window = None
    if args.cmd == "dicom":
        hu_window = _floats(args.hu_window)
        excl = [s.strip() for s in args.exclude_patients.split(",") if s.strip()]
        ds = D.DicomSliceDataset(args.paths, image_size=args.image_size, hu_window=hu_window,
                                 exclude_patients=excl, augment=not args.no_augment,
                                 scale_range=_floats(args.scale_range),
                                 nifti_paths=args.nifti, nifti_step=args.nifti_step)
    elif args.cmd == "patches":
        from ctflow.training.patches import PatchDataset, split_slices
        hu_window = _floats(args.hu_window)
        if args.split != "train":
            raise ValueError("a prior is trained on the train split only")
        ds = PatchDataset(split_slices(args.root, args.split, nifti_step=args.nifti_step,
                                       progress=True),
                          patch_size=args.image_size, hu_window=hu_window,
                          pixel_mm_range=_floats(args.pixel_mm), rotate_deg=args.rotate_deg)
    elif args.cmd == "ellipses":
        ds = D.ellipses_dataset(args.count, image_size=args.image_size, seed=args.seed)
    else:
        npz = Path(args.npz)
        if not npz.is_file():
            raise FileNotFoundError(f"MedMNIST file not found: {npz}")
        flag, _, size = npz.stem.partition("_")
        ds = D.medmnist_dataset(flag, split=args.split, size=int(size or 28), root=npz.parent,
                                image_size=args.image_size)
    model = UNet(channels=int(ds.sample(1, torch.Generator().manual_seed(0)).shape[1]),
                 base=args.base, channel_mults=_ints(args.channel_mults),
                 num_res_blocks=args.num_res_blocks,
                 attention_levels=_ints(args.attention_levels),
                 image_size=None if args.cmd == "patches" else args.image_size,
                 norm=args.norm, mid_attention=not args.no_mid_attention)
    print(f"{len(ds)} training images, model {model.num_parameters():,} parameters, "
          f"out {args.out}", flush=True)
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        res = train_prior(ds, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, model=model, weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                          ema_decay=args.ema_decay, grad_clip=args.grad_clip,
                          coupling=args.coupling, time_sampling=args.time_sampling,
                          seed=args.seed, checkpoint_every=args.checkpoint_every,
                          keep_every=args.keep_every, log_every=args.log_every,
                          resume=not args.no_resume, progress=args.progress,
                          hu_window=hu_window, name=args.name, device=args.device,
                          channels_last=args.channels_last, autocast=args.autocast,
                          command="ctflow train " + " ".join(shlex.quote(a) for a in argv),
                          stop=lambda: flag["stop"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"step {res.step} loss {res.final_loss} wall {res.seconds:.0f} s "
          f"checkpoint {res.checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
