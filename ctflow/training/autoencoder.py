r"""Training a latent flow prior: an autoencoder on CT slices, then a flow on its codes.

Three steps, each resumable (checkpoints as safetensors + JSON, never pickle):

1. ``autoencoder`` — :func:`train_autoencoder` fits :class:`~ctflow.flow.autoencoder.AutoEncoder`
   to images from a dataset of :mod:`ctflow.training.datasets` (augmented whole slices, cut into
   random ``crop × crop`` patches: the model is fully convolutional and local, so patches
   train it for whole images at a fraction of the cost) by minimising

   with AdamW, warm-up and cosine decay (:func:`ctflow.training.loop.lr_at`), gradient clipping
   and EMA weights (:class:`ctflow.training.loop.EMA`; the EMA weights are the autoencoder used
   afterwards).
2. ``flow`` — :func:`train_latent_flow`: the EMA autoencoder encodes the (un-augmented)
   training slices to fit the latent normalisation (per-channel mean and standard deviation,
   :class:`~ctflow.flow.autoencoder.LatentCodec`), then a pool of ``repeats`` augmented copies
   of every slice, and :func:`ctflow.training.prior.train_prior` (the project's flow-matching
   trainer, unchanged) trains a U-Net velocity field on the normalised codes (``scale = 1,
   shift = 0``: the codes *are* the flow's model space). The codec (autoencoder +
   normalisation) is written beside the flow checkpoints as ``codec.safetensors`` /
   ``codec.json``.
3. ``bundle`` — :func:`bundle_latent`: the newest flow checkpoint's EMA weights and the codec
   become one latent prior ``<dest>.safetensors`` + ``<dest>.json`` (``"kind": "latent"``,
   loaded by :func:`ctflow.priors.load_prior`; see :mod:`ctflow.priors.latent`).

Command line (:mod:`ctflow.cli.train`)::

    ctflow train autoencoder <DICOM folders> --exclude-patients ...
        --image-size 128 --out runs/ct128ae --steps 4000 ...
    ctflow train latent-flow <DICOM folders> --exclude-patients ...
        --autoencoder runs/ct128ae --out runs/ct128flow --steps 6000 ...
    ctflow train latent-bundle runs/ct128flow --name ct128latent

SIGTERM/SIGINT write a checkpoint and exit; rerunning the same command resumes bit-for-bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ctflow.flow.autoencoder import AutoEncoder, LatentCodec
from ctflow.flow.unet import UNet
from ctflow.priors.checkpoint import (PRIOR_FORMAT, CheckpointError, read_checkpoint,
                                      write_checkpoint)
from ctflow.priors.latent import save_latent_prior
from ctflow.training.datasets import ImageTensorDataset
from ctflow.training.loop import (EMA, checkpoint_saver, latest_checkpoint, loss_curve, lr_at,
                                  read_log, start_or_resume, training_loop)
from ctflow.training.prior import TrainResult, train_prior

__all__ = ["train_autoencoder", "AutoEncoderResult", "autoencoder_loss", "load_autoencoder",
           "encode_pool", "write_codec", "read_codec", "train_latent_flow", "bundle_latent"]

CODEC_KIND = "latent-codec"


def autoencoder_loss(model: AutoEncoder, x: torch.Tensor, *, noise: float, beta: float,
                     generator: Optional[torch.Generator] = None):
    r"""``(loss, recon_l1)``: :math:`\|D(E(x)+\sigma_n\varepsilon) - x\|_1/n +
    \|\cdot\|_2^2/n + \beta\|E(x)\|^2/m` (means over pixels and latent entries)."""
    z = model.encode(x)
    if noise > 0:
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z_in = z + noise * eps
    else:
        z_in = z
    xr = model.decode(z_in)
    l1 = (xr - x).abs().mean()
    loss = l1 + (xr - x).pow(2).mean() + beta * z.pow(2).mean()
    return loss, l1


def _random_crops(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    S = x.shape[-1]
    if crop >= S:
        return x
    off = torch.randint(0, S - crop + 1, (x.shape[0], 2), generator=generator)
    return torch.stack([x[i, :, int(a):int(a) + crop, int(b):int(b) + crop]
                        for i, (a, b) in enumerate(off)])


@dataclass
class AutoEncoderResult:
    """What :func:`train_autoencoder` returns: the EMA model (eval mode) and the run."""

    model: AutoEncoder
    step: int
    final_loss: Optional[float]
    seconds: float
    out_dir: str
    checkpoint: Optional[str]
    losses: List[dict] = field(default_factory=list)


def train_autoencoder(dataset, *, out_dir, steps: int, batch_size: int = 16, crop: int = 64,
                      lr: float = 1e-3, model: Optional[AutoEncoder] = None,
                      warmup_steps: int = 200, lr_schedule: str = "cosine",
                      min_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                      ema_decay: float = 0.999, grad_clip: float = 1.0, noise: float = 0.1,
                      beta: float = 1e-3, seed: int = 0, checkpoint_every: int = 200,
                      keep_last: int = 2, log_every: int = 10, resume: bool = True,
                      progress: bool = False, name: str = "autoencoder",
                      command: Optional[str] = None, device=None,
                      stop: Optional[Callable[[], bool]] = None) -> AutoEncoderResult:
    """Train an autoencoder on ``dataset`` (``sample(batch, generator)`` → images in
    ``[0, 1]``) on random ``crop``-sized patches; see the module docstring.

    Checkpoints ``ckpt-<step>`` (model, EMA, optimizer, generator and torch RNG states) go to
    ``out_dir`` every ``checkpoint_every`` steps and at the end; ``resume`` continues from the
    newest valid one. Returns :class:`AutoEncoderResult` with the EMA model.
    """
    if steps < 0 or batch_size < 1 or checkpoint_every < 1 or log_every < 1:
        raise ValueError(f"train_autoencoder: steps >= 0, batch_size, checkpoint_every, "
                         f"log_every >= 1 required; got {steps}, {batch_size}, "
                         f"{checkpoint_every}, {log_every}")
    if not hasattr(dataset, "sample"):
        raise ValueError("train_autoencoder: dataset must offer sample(batch_size, generator)")
    device = torch.device(device or "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    probe = dataset.sample(1, torch.Generator().manual_seed(0))
    if model is None:
        model = AutoEncoder(channels=int(probe.shape[1]), image_size=int(probe.shape[-1]))
    if crop % model.factor:
        raise ValueError(f"train_autoencoder: crop={crop} must be divisible by the "
                         f"downsampling factor {model.factor}")
    cfg = dict(model.config)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMA(model, ema_decay, True)
    gen = torch.Generator().manual_seed(int(seed))
    log_path = out / "loss.jsonl"
    hparams = dict(steps=int(steps), batch_size=int(batch_size), crop=int(crop), lr=float(lr),
                   warmup_steps=int(warmup_steps), lr_schedule=lr_schedule,
                   min_lr_ratio=float(min_lr_ratio), weight_decay=float(weight_decay),
                   ema_decay=float(ema_decay), grad_clip=float(grad_clip), noise=float(noise),
                   beta=float(beta), seed=int(seed))
    data_desc = dataset.describe() if hasattr(dataset, "describe") else {}
    ckpt, step, elapsed, commands, losses = start_or_resume(
        out, resume=resume, config=cfg, model=model, ema=ema, opt=opt, gen=gen,
        command=command)
    save = checkpoint_saver(out, model=model, ema=ema, opt=opt, gen=gen, keep_last=keep_last,
                            meta={"kind": "autoencoder", "name": name, "model": cfg,
                                  "train": hparams, "data": data_desc, "commands": commands})

    def loss_step():
        x = _random_crops(dataset.sample(batch_size, gen), crop, gen).to(device)
        loss, l1 = autoencoder_loss(model, x, noise=noise, beta=beta, generator=gen)
        return loss, {"l1": l1}

    end = training_loop(
        model=model, opt=opt, ema=ema, loss_step=loss_step,
        lr_of_step=lambda k: lr_at(k, lr=lr, warmup_steps=warmup_steps, total_steps=steps,
                                   schedule=lr_schedule, min_lr_ratio=min_lr_ratio),
        step=step, steps=steps, elapsed=elapsed, grad_clip=grad_clip, log_every=log_every,
        checkpoint_every=checkpoint_every, save=save, log_path=log_path, losses=losses,
        checkpoint=ckpt, stop=stop, progress=progress, what=name)
    step, last_loss, elapsed, path = end.step, end.last_loss, end.seconds, end.checkpoint
    ema_model = AutoEncoder.from_config(cfg)
    ema_model.load_state_dict(ema.shadow)
    ema_model.eval()
    return AutoEncoderResult(model=ema_model, step=step, final_loss=last_loss, seconds=elapsed,
                             out_dir=str(out), checkpoint=str(path) if path else None,
                             losses=losses)


def load_autoencoder(run_or_checkpoint) -> tuple:
    """``(model, meta)``: the EMA autoencoder (eval mode) of the newest valid checkpoint in a
    run folder, or of a given ``ckpt-*.json``."""
    src = Path(run_or_checkpoint)
    ckpt = latest_checkpoint(src) if src.is_dir() else src
    if ckpt is None:
        raise FileNotFoundError(f"no valid autoencoder checkpoint (ckpt-*.json) in {src}")
    tensors, meta = read_checkpoint(ckpt)
    if meta.get("kind") != "autoencoder":
        raise CheckpointError(f"{ckpt}: not an autoencoder training checkpoint")
    model = AutoEncoder.from_config(meta["model"])
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    meta = dict(meta)
    meta["checkpoint"] = Path(ckpt).name
    return model, meta


@torch.no_grad()
def encode_pool(codec: LatentCodec, dataset, *, repeats: int, batch_size: int = 32,
                seed: int = 0) -> torch.Tensor:
    """Model-space codes of ``repeats * len(dataset)`` augmented samples (seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = repeats * len(dataset)
    out = []
    for i in range(0, n, batch_size):
        x = dataset.sample(min(batch_size, n - i), gen)
        out.append(codec.encode(x))
    return torch.cat(out)


def write_codec(codec: LatentCodec, stem, *, meta: dict) -> Path:
    """Save a codec (autoencoder weights + latent normalisation) as ``<stem>.safetensors`` +
    ``<stem>.json`` (``"kind": "latent-codec"``)."""
    m = {"format": PRIOR_FORMAT, "format_version": 1, "kind": CODEC_KIND,
         "autoencoder": codec.config, "latent_mean": codec.mean.tolist(),
         "latent_std": codec.std.tolist(), **meta}
    return write_checkpoint(codec.state_dict(), m, stem)


def read_codec(stem) -> tuple:
    """``(codec, meta)`` from :func:`write_codec` files."""
    tensors, meta = read_checkpoint(stem)
    if meta.get("kind") != CODEC_KIND:
        raise CheckpointError(f"{stem}: not a latent codec (kind {meta.get('kind')!r})")
    codec = LatentCodec(AutoEncoder.from_config(meta["autoencoder"]))
    codec.load_state_dict(tensors)
    return codec.eval(), meta


def train_latent_flow(dataset, *, autoencoder, out_dir, steps: int, repeats: int = 16,
                      velocity_config: Optional[dict] = None, hu_window=None,
                      name: str = "latent", seed: int = 0, command: Optional[str] = None,
                      log: Optional[Callable[[str], None]] = None,
                      **train_options) -> TrainResult:
    """Step 2 of the module docstring: train a flow on the codes of an autoencoder.

    Args:
        dataset: the training slices (a :class:`~ctflow.training.datasets.CTSliceDataset`:
            ``sample`` gives augmented images, ``dataset[i]`` the plain ones).
        autoencoder: the autoencoder run folder or ``ckpt-*.json`` (:func:`load_autoencoder`).
        out_dir: the flow run folder; receives ``codec.safetensors/.json`` and the flow
            checkpoints.
        steps: flow-matching steps. repeats: augmented copies of every slice in the code pool.
        velocity_config: keyword arguments of :class:`~ctflow.flow.unet.UNet` besides
            ``channels`` and ``image_size`` (those are the codes' shape).
        hu_window, name, seed, command: recorded in the codec and the checkpoints.
        log: called with one line about the code pool (e.g. ``print``).
        **train_options: further keyword arguments of :func:`ctflow.training.prior.train_prior`
            (``batch_size``, ``lr``, ``coupling``, ``resume``, ``stop``, ...).

    Returns:
        the :class:`~ctflow.training.prior.TrainResult` of the flow.
    """
    ae, ae_meta = load_autoencoder(autoencoder)
    codec = LatentCodec(ae)
    plain = torch.stack([dataset[i] for i in range(len(dataset))])
    codec.fit_normalisation(plain)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    codes = encode_pool(codec, dataset, repeats=repeats, seed=seed)
    enc_s = time.perf_counter() - t0
    with torch.no_grad():
        mse = float((codec.decode(codec.encode(plain)) - plain).pow(2).mean())
    codes_desc = {"repeats": int(repeats), "count": int(codes.shape[0]),
                  "shape": list(codes.shape[1:]), "encode_seconds": round(enc_s, 1),
                  "train_recon_psnr_db": round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)}
    ae_training = {"steps": ae_meta["step"], "final_loss": ae_meta.get("last_loss"),
                   "wall_seconds": round(ae_meta.get("elapsed_seconds", 0.0), 1),
                   "hyperparameters": ae_meta.get("train", {}),
                   "commands": ae_meta.get("commands", []),
                   "parameters": ae_meta.get("parameters"), "ema": True,
                   "source_checkpoint": ae_meta["checkpoint"]}
    slices_desc = dataset.describe() if hasattr(dataset, "describe") else {}
    write_codec(codec, out / "codec",
                meta={"name": name + "-codec", "image_size": int(plain.shape[-1]),
                      "hu_window": list(hu_window) if hu_window is not None else None,
                      "data": slices_desc, "training": ae_training, "codes": codes_desc})
    if log is not None:
        log(f"{codes.shape[0]} codes {tuple(codes.shape[1:])}, training-slice "
            f"reconstruction {codes_desc['train_recon_psnr_db']} dB")
    net = UNet(channels=int(codes.shape[1]), image_size=int(codes.shape[-1]),
               **(velocity_config or {}))
    pool = ImageTensorDataset(codes, description={"source": "latent codes", **codes_desc})
    return train_prior(pool, out_dir=out, steps=steps, model=net, seed=seed, scale=1.0,
                       shift=0.0, hu_window=hu_window, name=name,
                       data_description={"codes": codes_desc, "slices": slices_desc},
                       command=command, **train_options)


def bundle_latent(flow_run, dest_stem, *, name: Optional[str] = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Combine the newest flow checkpoint in ``flow_run`` (EMA weights) and its
    ``codec.*`` into one latent prior ``<dest_stem>.safetensors/.json``
    (:func:`ctflow.priors.latent.save_latent_prior`), recording both trainings (steps,
    losses, wall times, commands) and the training data. Returns the JSON path."""
    run = Path(flow_run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no valid flow checkpoint (ckpt-*.json) in {run}")
    tensors, meta = read_checkpoint(ckpt)
    codec, cmeta = read_codec(run / "codec")
    velocity = UNet.from_config(meta["model"])
    velocity.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    curve = loss_curve(read_log(run / "loss.jsonl"), max_points=100, last_step=meta["step"])
    pm = meta["prior"]
    training = {
        "autoencoder": cmeta.get("training", {}),
        "flow": {"steps": meta["step"], "final_loss": meta.get("last_loss"),
                 "wall_seconds": round(meta.get("elapsed_seconds", 0.0), 1),
                 "hyperparameters": meta.get("train", {}), "commands": meta.get("commands", []),
                 "parameters": meta.get("parameters"), "ema": True,
                 "source_checkpoint": Path(ckpt).name, "loss_curve": curve,
                 "codes": cmeta.get("codes", {})},
    }
    return save_latent_prior(velocity, codec, dest_stem, image_size=int(cmeta["image_size"]),
                             hu_window=pm.get("hu_window"),
                             name=name or pm.get("name") or Path(dest_stem).name,
                             data=cmeta.get("data", {}), training=training, dtype=dtype)
