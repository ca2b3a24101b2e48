r"""Training a latent flow prior: an autoencoder on CT slices, then a flow on its codes.

Three steps, each resumable (checkpoints as safetensors + JSON, never pickle):

1. ``autoencoder`` — :func:`train_autoencoder` fits :class:`~ctflow.flow.autoencoder.AutoEncoder`
   to images from a dataset of :mod:`ctflow.training.datasets` (augmented whole slices, cut into
   random ``crop × crop`` patches: the model is fully convolutional and local, so patches
   train it for whole images at a fraction of the cost) by minimising

   .. math:: \|D(E(x) + \sigma_n\varepsilon) - x\|_1/n + \|D(E(x) + \sigma_n\varepsilon) - x\|_2^2/n
             + \beta\,\|E(x)\|_2^2/m

   with AdamW, warm-up and cosine decay (:func:`ctflow.training.prior.lr_at`), gradient clipping
   and EMA weights (:class:`ctflow.training.prior.EMA`; the EMA weights are the autoencoder used
   afterwards).
2. ``flow`` — the EMA autoencoder encodes the (un-augmented) training slices to fit the latent
   normalisation (per-channel mean and standard deviation, :class:`~ctflow.flow.autoencoder.
   LatentCodec`), then a pool of ``repeats`` augmented copies of every slice, and
   :func:`ctflow.training.prior.train_prior` (the project's flow-matching trainer, unchanged)
   trains a U-Net velocity field on the normalised codes (``scale = 1, shift = 0``: the codes
   *are* the flow's model space). The codec (autoencoder + normalisation) is written beside
   the flow checkpoints as ``codec.safetensors`` / ``codec.json``.
3. ``bundle`` — the newest flow checkpoint's EMA weights and the codec become one latent prior
   ``<dest>.safetensors`` + ``<dest>.json`` (``"kind": "latent"``, loaded by
   :func:`ctflow.priors.load_prior`; see :mod:`ctflow.priors.latent`).

Command line::

    python -m ctflow.training.autoencoder autoencoder <DICOM folders> --exclude-patients ...
        --image-size 128 --out runs/ct128ae --steps 4000 ...
    python -m ctflow.training.autoencoder flow <DICOM folders> --exclude-patients ...
        --autoencoder runs/ct128ae --out runs/ct128flow --steps 6000 ...
    python -m ctflow.training.autoencoder bundle runs/ct128flow --name ct128latent

SIGTERM/SIGINT write a checkpoint and exit; rerunning the same command resumes bit-for-bit.
"""
from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from ctflow.priors.checkpoint import (PRIOR_FORMAT, TRAIN_FORMAT, CheckpointError, read_checkpoint,
                                 write_checkpoint)
from ctflow.flow.autoencoder import AutoEncoder, LatentCodec
from ctflow.training.prior import (EMA, _prune, _read_log, latest_checkpoint, lr_at, restore_training_state,
                    training_loop, training_state)

__all__ = ["train_autoencoder", "AutoEncoderResult", "autoencoder_loss", "load_autoencoder",
           "encode_pool", "write_codec", "read_codec", "bundle_latent", "main"]

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
    step, elapsed = 0, 0.0
    log_path = out / "loss.jsonl"
    hparams = dict(steps=int(steps), batch_size=int(batch_size), crop=int(crop), lr=float(lr),
                   warmup_steps=int(warmup_steps), lr_schedule=lr_schedule,
                   min_lr_ratio=float(min_lr_ratio), weight_decay=float(weight_decay),
                   ema_decay=float(ema_decay), grad_clip=float(grad_clip), noise=float(noise),
                   beta=float(beta), seed=int(seed))
    data_desc = dataset.describe() if hasattr(dataset, "describe") else {}
    commands: List[str] = []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        tensors, meta = read_checkpoint(ckpt)
        if meta.get("model") != cfg:
            raise ValueError(f"{ckpt}: checkpoint model config {meta.get('model')} differs from "
                             f"the requested {cfg}; use another out_dir or resume=False")
        step, elapsed, commands = restore_training_state(tensors, meta, model, ema, opt, gen,
                                                         log_path)
    elif log_path.exists():
        log_path.unlink()
    if command:
        commands.append(command)
    losses = _read_log(log_path)

    def save(step_now: int, last: Optional[float], seconds: float) -> Path:
        tensors, ometa = training_state(model, ema, opt, gen)
        meta = {"format": TRAIN_FORMAT, "kind": "autoencoder", "name": name,
                "step": int(step_now), "elapsed_seconds": float(seconds), "last_loss": last,
                "model": cfg, "train": hparams, "data": data_desc, "commands": commands,
                "optimizer": ometa,
                "parameters": int(sum(p.numel() for p in model.parameters()))}
        path = write_checkpoint(tensors, meta, out / f"ckpt-{step_now:08d}")
        _prune(out, step_now, keep_last, None)
        return path

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


def bundle_latent(flow_run, dest_stem, *, name: Optional[str] = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Combine the newest flow checkpoint in ``flow_run`` (EMA weights) and its
    ``codec.*`` into one latent prior ``<dest_stem>.safetensors/.json``
    (:func:`ctflow.priors.latent.save_latent_prior`), recording both trainings (steps,
    losses, wall times, commands) and the training data. Returns the JSON path."""
    from ctflow.priors.latent import save_latent_prior
    from ctflow.flow.unet import UNet

    run = Path(flow_run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no valid flow checkpoint (ckpt-*.json) in {run}")
    tensors, meta = read_checkpoint(ckpt)
    codec, cmeta = read_codec(run / "codec")
    velocity = UNet.from_config(meta["model"])
    velocity.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    log = [r for r in _read_log(run / "loss.jsonl") if r["step"] <= meta["step"]]
    stride = max(1, math.ceil(len(log) / 100))
    curve = [[r["step"], round(r["loss"], 5)] for r in log[::stride]]
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


# ---------------------------------------------------------------------- command line
def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _floats(s: str) -> tuple:
    return tuple(float(v) for v in s.split(","))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctflow.training.autoencoder",
                                description="Train a latent flow prior (autoencoder, then a "
                                            "flow on its codes) or bundle one.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def data(q):
        q.add_argument("paths", nargs="+", help="DICOM folders or files")
        q.add_argument("--nifti", nargs="*", default=[])
        q.add_argument("--nifti-step", type=int, default=2)
        q.add_argument("--exclude-patients", default="",
                       help="comma-separated patient IDs never to train on")
        q.add_argument("--hu-window", default="-1024,1024")
        q.add_argument("--scale-range", default="0.85,1.0")
        q.add_argument("--image-size", type=int, default=128)

    def common(q):
        q.add_argument("--out", required=True)
        q.add_argument("--steps", type=int, required=True)
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--warmup-steps", type=int, default=200)
        q.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
        q.add_argument("--ema-decay", type=float, default=0.999)
        q.add_argument("--grad-clip", type=float, default=1.0)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--checkpoint-every", type=int, default=200)
        q.add_argument("--log-every", type=int, default=10)
        q.add_argument("--no-resume", action="store_true")
        q.add_argument("--progress", action="store_true")
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--name", default="ct128latent")
        q.add_argument("--device", default=None)

    a = sub.add_parser("autoencoder", help="train the autoencoder on CT slices")
    data(a)
    common(a)
    a.add_argument("--crop", type=int, default=64)
    a.add_argument("--latent-channels", type=int, default=4)
    a.add_argument("--base", type=int, default=16)
    a.add_argument("--channel-mults", default="1,2,4")
    a.add_argument("--num-res-blocks", type=int, default=1)
    a.add_argument("--noise", type=float, default=0.1)
    a.add_argument("--beta", type=float, default=1e-3)

    f = sub.add_parser("flow", help="train a latent flow on the autoencoder's codes")
    data(f)
    common(f)
    f.add_argument("--autoencoder", required=True, help="autoencoder run folder or ckpt json")
    f.add_argument("--repeats", type=int, default=16,
                   help="augmented copies of every slice in the code pool")
    f.add_argument("--base", type=int, default=32)
    f.add_argument("--channel-mults", default="1,2,2")
    f.add_argument("--num-res-blocks", type=int, default=2)
    f.add_argument("--attention-levels", default="2")
    f.add_argument("--coupling", choices=["ot", "independent"], default="ot")
    f.add_argument("--time-sampling", choices=["uniform", "logit_normal"], default="uniform")

    b = sub.add_parser("bundle", help="export flow + codec as one latent prior")
    b.add_argument("run", help="flow run folder (with codec.json)")
    b.add_argument("--name", required=True)
    b.add_argument("--dest", default=None,
                   help="output stem (default: ctflow/priors/bundled/<name>)")
    b.add_argument("--float16", action="store_true")
    return p


def _dataset(args):
    from ctflow.training.datasets import DicomSliceDataset
    excl = [s.strip() for s in args.exclude_patients.split(",") if s.strip()]
    return DicomSliceDataset(args.paths, image_size=args.image_size,
                             hu_window=_floats(args.hu_window), exclude_patients=excl,
                             scale_range=_floats(args.scale_range), nifti_paths=args.nifti,
                             nifti_step=args.nifti_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.cmd == "bundle":
        dest = args.dest or str(Path(__file__).resolve().parents[1] / "priors" / "bundled"
                                / args.name)
        path = bundle_latent(args.run, dest, name=args.name,
                             dtype=torch.float16 if args.float16 else torch.float32)
        print(f"bundled {args.run} -> {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ("python -m ctflow.training.autoencoder "
               + " ".join(shlex.quote(a) for a in argv))
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ds = _dataset(args)
        if args.cmd == "autoencoder":
            model = AutoEncoder(channels=1, latent_channels=args.latent_channels, base=args.base,
                                channel_mults=_ints(args.channel_mults),
                                num_res_blocks=args.num_res_blocks, image_size=args.image_size)
            print(f"{len(ds)} training slices, autoencoder {model.num_parameters():,} "
                  f"parameters, latent {model.latent_shape(args.image_size)}", flush=True)
            res = train_autoencoder(ds, out_dir=args.out, steps=args.steps,
                                    batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                                    model=model, warmup_steps=args.warmup_steps,
                                    lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
                                    grad_clip=args.grad_clip, noise=args.noise, beta=args.beta,
                                    seed=args.seed, checkpoint_every=args.checkpoint_every,
                                    log_every=args.log_every, resume=not args.no_resume,
                                    progress=args.progress, name=args.name + "-autoencoder",
                                    command=command, device=args.device,
                                    stop=lambda: flag["stop"])
            print(f"step {res.step} loss {res.final_loss} wall {res.seconds:.0f} s "
                  f"checkpoint {res.checkpoint}", flush=True)
            return 0
        from ctflow.training.datasets import ImageTensorDataset
        from ctflow.training.prior import train_prior
        from ctflow.flow.unet import UNet
        ae, ae_meta = load_autoencoder(args.autoencoder)
        codec = LatentCodec(ae)
        codec.fit_normalisation(ds._plain)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        codes = encode_pool(codec, ds, repeats=args.repeats, seed=args.seed)
        enc_s = time.perf_counter() - t0
        with torch.no_grad():
            recon = codec.decode(codec.encode(ds._plain))
            mse = float((recon - ds._plain).pow(2).mean())
        codes_desc = {"repeats": args.repeats, "count": int(codes.shape[0]),
                      "shape": list(codes.shape[1:]), "encode_seconds": round(enc_s, 1),
                      "train_recon_psnr_db": round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)}
        ae_training = {"steps": ae_meta["step"], "final_loss": ae_meta.get("last_loss"),
                       "wall_seconds": round(ae_meta.get("elapsed_seconds", 0.0), 1),
                       "hyperparameters": ae_meta.get("train", {}),
                       "commands": ae_meta.get("commands", []),
                       "parameters": ae_meta.get("parameters"), "ema": True,
                       "source_checkpoint": ae_meta["checkpoint"]}
        write_codec(codec, out / "codec",
                    meta={"name": args.name + "-codec", "image_size": args.image_size,
                          "hu_window": list(_floats(args.hu_window)), "data": ds.describe(),
                          "training": ae_training, "codes": codes_desc})
        print(f"{codes.shape[0]} codes {tuple(codes.shape[1:])}, training-slice "
              f"reconstruction {codes_desc['train_recon_psnr_db']} dB", flush=True)
        C, S = int(codes.shape[1]), int(codes.shape[-1])
        net = UNet(channels=C, base=args.base, channel_mults=_ints(args.channel_mults),
                   num_res_blocks=args.num_res_blocks,
                   attention_levels=_ints(args.attention_levels), image_size=S)
        pool = ImageTensorDataset(codes, description={"source": "latent codes",
                                                      **codes_desc})
        res = train_prior(pool, out_dir=out, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, model=net, warmup_steps=args.warmup_steps,
                          lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
                          grad_clip=args.grad_clip, coupling=args.coupling,
                          time_sampling=args.time_sampling, seed=args.seed,
                          checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                          resume=not args.no_resume, progress=args.progress, scale=1.0,
                          shift=0.0, hu_window=_floats(args.hu_window), name=args.name,
                          data_description={"codes": codes_desc, "slices": ds.describe()},
                          command=command, device=args.device, stop=lambda: flag["stop"])
        print(f"step {res.step} loss {res.final_loss} wall {res.seconds:.0f} s "
              f"checkpoint {res.checkpoint}", flush=True)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())
