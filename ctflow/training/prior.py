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

Command line: ``ctflow train dicom|patches|ellipses|medmnist ...`` (train) and ``ctflow train
bundle ...`` (export the EMA weights of the newest checkpoint as a prior), in
:mod:`ctflow.cli.train`. The loop, EMA, learning-rate schedule and checkpoint state are in
:mod:`ctflow.training.loop`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from ctflow.flow.unet import UNet
from ctflow.priors.base import FlowPrior
from ctflow.priors.checkpoint import TRAIN_FORMAT, CheckpointError, read_checkpoint, save_prior
from ctflow.training.portable import portable
from ctflow.training.loop import (EMA, checkpoint_saver, latest_checkpoint, loss_curve, lr_at,
                                  read_log, start_or_resume, training_loop)

__all__ = ["train_prior", "TrainResult", "ot_couple", "sample_times", "flow_matching_loss",
           "bundle_checkpoint", "COUPLINGS", "TIME_SAMPLINGS"]

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
    """:math:`\\operatorname{mean}\\|v(x_t, t) - (x_1 - x_0)\\|^2` with
    :math:`x_t = t x_1 + (1-t) x_0`."""
    tb = t.to(x1).reshape(-1, *([1] * (x1.ndim - 1)))
    xt = tb * x1 + (1 - tb) * x0
    return (model(xt, t.to(x1)).float() - (x1 - x0)).pow(2).mean()



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
    log_path = out / "loss.jsonl"

    hparams = dict(steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                   weight_decay=float(weight_decay), betas=list(betas),
                   warmup_steps=int(warmup_steps), lr_schedule=lr_schedule,
                   min_lr_ratio=float(min_lr_ratio), ema_decay=float(ema_decay),
                   ema_warmup=bool(ema_warmup), grad_clip=float(grad_clip), coupling=coupling,
                   time_sampling=time_sampling, seed=int(seed),
                   checkpoint_every=int(checkpoint_every), log_every=int(log_every),
                   autocast=autocast)
    agnostic = bool(getattr(dataset, "size_agnostic", False))
    pixel_mm = list(dataset.pixel_mm_range) if agnostic else None
    prior_meta = {"name": name, "image_size": None if agnostic else image_size,
                  "channels": channels, "scale": float(scale), "shift": float(shift),
                  "hu_window": list(hu_window) if hu_window is not None else None}
    if agnostic:  # trained on patches: any image side divisible by the network's factor
        prior_meta.update(size_agnostic=True, pixel_mm=pixel_mm,
                          size_multiple=int(getattr(model, "factor", 1)))
    data_desc = data_description or (dataset.describe() if hasattr(dataset, "describe") else {})

    ckpt, step, elapsed, commands, losses = start_or_resume(
        out, resume=resume, config=cfg, model=model, ema=ema, opt=opt, gen=gen,
        command=command)
    if ckpt is not None:
        for g in opt.param_groups:  # hyper-parameters may change between runs
            g["weight_decay"] = float(weight_decay)
            g["betas"] = tuple(betas)
    save = checkpoint_saver(out, model=model, ema=ema, opt=opt, gen=gen, keep_last=keep_last,
                            keep_every=keep_every,
                            meta={"name": name, "model": cfg, "prior": prior_meta,
                                  "train": hparams, "data": data_desc, "commands": commands})

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
    prior = FlowPrior(ema_model, image_size=prior_meta["image_size"], channels=channels,
                      scale=scale, shift=shift, hu_window=hu_window, name=name,
                      size_multiple=prior_meta.get("size_multiple", 1), pixel_mm=pixel_mm,
                      config={"model": cfg, "train": hparams, "step": step}).eval()
    return TrainResult(prior=prior, step=step, final_loss=last_loss, seconds=elapsed,
                       out_dir=str(out), checkpoint=str(path) if path else None, losses=losses)


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
    curve = loss_curve(read_log(Path(ckpt).parent / "loss.jsonl"), max_points=200,
                       last_step=meta["step"])
    training = {"steps": meta["step"], "final_loss": meta.get("last_loss"),
                "wall_seconds": round(meta.get("elapsed_seconds", 0.0), 1),
                "hyperparameters": meta.get("train", {}), "commands": meta.get("commands", []),
                "parameters": meta.get("parameters"), "ema": True,
                "source_checkpoint": Path(ckpt).name, "loss_curve": curve}
    data = dict(meta.get("data", {}))
    if extra:
        data.update(extra)
    run = Path(ckpt).parent
    data, training = portable(data, run), portable(training, run)   # no machine paths
    # patch-trained runs (also those from before the flag was recorded) are size-agnostic
    agnostic = bool(pm.get("size_agnostic")) or data.get("type") == "PatchDataset"
    return save_prior(model, dest_stem, image_size=pm["image_size"], channels=pm["channels"],
                      scale=pm["scale"], shift=pm["shift"], hu_window=pm.get("hu_window"),
                      name=name or pm.get("name"), data=data, training=training, dtype=dtype,
                      size_agnostic=agnostic, size_multiple=model.factor,
                      pixel_mm=pm.get("pixel_mm") or data.get("pixel_mm_range"))

