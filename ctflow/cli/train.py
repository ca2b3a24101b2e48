"""``ctflow train``: train a flow-matching prior or a latent prior, or bundle one.

::

    ctflow train dicom PATHS... --out RUN --steps N      # CT slices from DICOM (+ NIfTI)
    ctflow train patches ROOT --out RUN --steps N        # size-agnostic, full-resolution patches
    ctflow train ellipses --out RUN --steps N            # random ellipse phantoms
    ctflow train medmnist FILE.npz --out RUN --steps N   # a local MedMNIST file
    ctflow train bundle RUN --name NAME                  # EMA weights -> a prior
    ctflow train autoencoder PATHS... --out AE --steps N           # latent prior, step 1
    ctflow train latent-flow PATHS... --autoencoder AE --out RUN --steps N   # step 2
    ctflow train latent-bundle RUN --name NAME                      # step 3

The trainers are :func:`ctflow.training.train_prior`, :func:`ctflow.training.train_autoencoder`
and :func:`ctflow.training.train_latent_flow`. The global ``--device`` (default auto: CUDA when
available), ``--seed`` and ``--threads`` apply. SIGTERM/SIGINT write a checkpoint and exit;
rerunning the same command resumes bit-for-bit (``--no-resume`` starts afresh).
"""
from __future__ import annotations

import contextlib
import shlex
import signal
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ctflow.cli.common import CLIError, add_command
from ctflow.flow.autoencoder import AutoEncoder
from ctflow.flow import UNet
from ctflow.priors.registry import bundled_dir
from ctflow.training import (COUPLINGS, TIME_SAMPLINGS, DicomSliceDataset, PatchDataset,
                             bundle_checkpoint, bundle_latent, ellipses_dataset, export_state,
                             import_state, medmnist_dataset, split_slices, train_autoencoder,
                             train_latent_flow, train_prior)

__all__ = ["register", "cmd_train"]

EPILOG = """\
examples:
  ctflow train ellipses --out runs/ell --steps 2000 --image-size 32
  ctflow train dicom data/train/ --exclude-patients A058062,A062055 --out runs/ct64 \\
      --steps 40000 --image-size 64
  ctflow train bundle runs/ct64 --name ct64
  ctflow train autoencoder data/train/ --out runs/ct128ae --steps 4000
  ctflow train latent-flow data/train/ --autoencoder runs/ct128ae --out runs/ct128flow \\
      --steps 6000
  ctflow train latent-bundle runs/ct128flow --name ct128latent

Run 'ctflow train SUBCOMMAND --help' for the options of one trainer.
"""


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _floats(s: str) -> tuple:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise CLIError(f"expected comma-separated numbers, got {s!r}") from None


# ---------------------------------------------------------------------- parsers
def _run_options(q, *, lr: float, warmup: int, schedule: str) -> None:
    """Options of every trainer: run folder, steps, optimiser, checkpoints, logging."""
    q.add_argument("--out", required=True, help="run directory (checkpoints, loss.jsonl)")
    q.add_argument("--steps", type=int, required=True, help="total optimisation steps")
    q.add_argument("--batch-size", type=int, default=16, help="images per step")
    q.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    q.add_argument("--warmup-steps", type=int, default=warmup, help="linear warm-up")
    q.add_argument("--lr-schedule", choices=["constant", "cosine"], default=schedule,
                   help="after the warm-up")
    q.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights")
    q.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    q.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    q.add_argument("--log-every", type=int, default=10, help="steps between loss.jsonl lines")
    q.add_argument("--no-resume", action="store_true",
                   help="start afresh instead of resuming from the newest checkpoint")
    q.add_argument("--progress", action="store_true", help="a progress bar")


def _flow_options(q, *, image_size: Optional[int], base: int, mults: str, blocks: int) -> None:
    """Options of the flow trainers: coupling, time sampling, the U-Net."""
    q.add_argument("--coupling", choices=list(COUPLINGS), default="ot",
                   help="noise-data coupling (ot: minibatch optimal transport)")
    q.add_argument("--time-sampling", choices=list(TIME_SAMPLINGS), default="uniform",
                   help="distribution of the training times")
    if image_size is not None:
        q.add_argument("--image-size", type=int, default=image_size, help="image (patch) size")
    q.add_argument("--base", type=int, default=base, help="U-Net width")
    q.add_argument("--channel-mults", default=mults, help="U-Net width per level")
    q.add_argument("--num-res-blocks", type=int, default=blocks, help="blocks per level")
    q.add_argument("--attention-levels", default="2",
                   help="levels with self-attention (comma-separated; '': none)")


def _prior_options(q, *, image_size: Optional[int] = 64) -> None:
    """Options of the pixel-space prior trainers (``image_size=None``: added elsewhere)."""
    _run_options(q, lr=2e-4, warmup=500, schedule="constant")
    _flow_options(q, image_size=image_size, base=16, mults="1,2,4,6", blocks=2)
    q.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    q.add_argument("--keep-every", type=int, default=None,
                   help="also keep every checkpoint whose step is a multiple of this")
    q.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format (faster CPU convolutions)")
    q.add_argument("--name", default="prior", help="recorded in the checkpoints")
    q.add_argument("--norm", choices=["group", "channel"], default="group",
                   help="normalisation (channel: per pixel, for size-agnostic priors)")
    q.add_argument("--no-mid-attention", action="store_true",
                   help="no self-attention in the middle block")
    q.add_argument("--autocast", choices=["bf16"], default=None,
                   help="bfloat16 autocast for the network")


def _slice_options(q, *, hu_window: str, image_size: int) -> None:
    """Options of the trainers on DICOM slices."""
    q.add_argument("paths", nargs="+", help="DICOM folders or files")
    q.add_argument("--nifti", nargs="*", default=[], help="NIfTI volumes (axial slices added)")
    q.add_argument("--nifti-step", type=int, default=2, help="every k-th NIfTI slice")
    q.add_argument("--exclude-patients", default="",
                   help="comma-separated patient IDs never to train on (held-out split)")
    q.add_argument("--hu-window", default=hu_window, help="LO,HI mapped to [0, 1]")
    q.add_argument("--scale-range", default="0.85,1.0",
                   help="random crop sizes (fractions; augmentation)")
    q.add_argument("--image-size", type=int, default=image_size, help="image (patch) size")


def _bundle_options(q, what: str) -> None:
    q.add_argument("run", help=what)
    q.add_argument("--name", required=True, help="the prior's name")
    q.add_argument("--dest", default=None,
                   help="output stem (default: the bundled priors' folder/<name>)")
    q.add_argument("--float16", action="store_true", help="store the weights as float16")


def register(sub) -> None:
    """Add ``train`` and its sub-commands to the sub-parsers ``sub``."""
    p = add_command(sub, "train", "train a flow-matching prior or a latent prior, or bundle "
                    "one", EPILOG, None)
    tsub = p.add_subparsers(dest="trainer", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str):
        return add_command(tsub, name, help_, "", cmd_train)

    q = add("dicom", "train on CT slices from DICOM files/folders")
    _slice_options(q, hu_window="-1024,1024", image_size=64)
    q.add_argument("--no-augment", action="store_true", help="no random crops or flips")
    _prior_options(q, image_size=None)
    q = add("patches", "train a size-agnostic prior on patches of the full-resolution "
            "training split")
    q.add_argument("root", help="local copy of the CT source folders (ctflow.data.splits)")
    q.add_argument("--split", default="train", help="the split to train on")
    q.add_argument("--hu-window", default="-1024,2000", help="LO,HI mapped to [0, 1]")
    q.add_argument("--pixel-mm", default="0.6,2.0", help="patch pixel sizes in mm (min,max)")
    q.add_argument("--rotate-deg", type=float, default=10.0, help="random rotations (degrees)")
    q.add_argument("--nifti-step", type=int, default=2, help="every k-th NIfTI slice")
    _prior_options(q)
    q = add("ellipses", "train on random ellipse phantoms")
    q.add_argument("--count", type=int, default=1024, help="number of phantoms")
    _prior_options(q)
    q = add("medmnist", "train on a local MedMNIST .npz file")
    q.add_argument("npz", help="<flag>_<size>.npz (or <flag>.npz for size 28), e.g. "
                               "organamnist_64.npz")
    q.add_argument("--split", default="train", help="the split to train on")
    _prior_options(q)
    _bundle_options(add("bundle", "export the EMA weights of a run as a prior"),
                    "run directory or ckpt-*.json")

    q = add("autoencoder", "latent prior, step 1: train the autoencoder on CT slices")
    _slice_options(q, hu_window="-1024,1024", image_size=128)
    _run_options(q, lr=1e-3, warmup=200, schedule="cosine")
    q.add_argument("--name", default="ct128latent", help="recorded in the checkpoints")
    q.add_argument("--crop", type=int, default=64, help="training patch size")
    q.add_argument("--latent-channels", type=int, default=4, help="channels of the codes")
    q.add_argument("--base", type=int, default=16, help="autoencoder width")
    q.add_argument("--channel-mults", default="1,2,4", help="width per level")
    q.add_argument("--num-res-blocks", type=int, default=1, help="blocks per level")
    q.add_argument("--noise", type=float, default=0.1, help="noise on the codes in training")
    q.add_argument("--beta", type=float, default=1e-3, help="weight of the code penalty")
    q = add("latent-flow", "latent prior, step 2: train a flow on the autoencoder's codes")
    _slice_options(q, hu_window="-1024,1024", image_size=128)
    _run_options(q, lr=1e-3, warmup=200, schedule="cosine")
    q.add_argument("--name", default="ct128latent", help="recorded in the checkpoints")
    q.add_argument("--autoencoder", required=True, help="autoencoder run folder or ckpt json")
    q.add_argument("--repeats", type=int, default=16,
                   help="augmented copies of every slice in the code pool")
    _flow_options(q, image_size=None, base=32, mults="1,2,2", blocks=2)
    _bundle_options(add("latent-bundle", "latent prior, step 3: export flow + codec as one "
                        "latent prior"), "flow run folder (with codec.json)")
    q = add("export-state", "write the compact resumable state (float16 weights + EMA, RNG, "
            "loss log) of a run's newest checkpoint, to carry the run to another machine")
    q.add_argument("run", help="run directory")
    q.add_argument("--dest", required=True, help="output stem (STEM.safetensors/.json/"
                   ".loss.jsonl; replaced)")
    q = add("import-state", "turn a compact state into a checkpoint of a run folder; then "
            "rerun the training command with --out RUN to resume")
    q.add_argument("state", help="the stem written by export-state")
    q.add_argument("--out", required=True, help="run directory (created)")


# ---------------------------------------------------------------------- commands
@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """``stop()`` becomes true on SIGTERM/SIGINT (the trainer then checkpoints and returns)."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: flag["stop"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _slice_dataset(args, *, augment: bool = True) -> DicomSliceDataset:
    excl = [s.strip() for s in args.exclude_patients.split(",") if s.strip()]
    return DicomSliceDataset(args.paths, image_size=args.image_size,
                             hu_window=_floats(args.hu_window), exclude_patients=excl,
                             augment=augment, scale_range=_floats(args.scale_range),
                             nifti_paths=args.nifti, nifti_step=args.nifti_step)


def _prior_dataset(args):
    """The training images of ``dicom``/``patches``/``ellipses``/``medmnist`` and their HU
    window (``None`` for non-CT data)."""
    if args.trainer == "dicom":
        return _slice_dataset(args, augment=not args.no_augment), _floats(args.hu_window)
    if args.trainer == "patches":
        if args.split != "train":
            raise CLIError(f"--split {args.split}: a prior is trained on the train split only")
        window = _floats(args.hu_window)
        slices = split_slices(args.root, args.split, nifti_step=args.nifti_step, progress=True)
        return PatchDataset(slices, patch_size=args.image_size, hu_window=window,
                            pixel_mm_range=_floats(args.pixel_mm),
                            rotate_deg=args.rotate_deg), window
    if args.trainer == "ellipses":
        return ellipses_dataset(args.count, image_size=args.image_size, seed=args.seed), None
    npz = Path(args.npz)
    if not npz.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {npz}")
    flag, _, size = npz.stem.partition("_")
    return medmnist_dataset(flag, split=args.split, size=int(size or 28), root=npz.parent,
                            image_size=args.image_size), None


def _run_kwargs(args, stop: Callable[[], bool]) -> dict:
    """Keyword arguments every trainer takes, from the shared options."""
    return dict(out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                resume=not args.no_resume, progress=args.progress, device=args.device,
                command="ctflow " + " ".join(shlex.quote(a) for a in args.argv), stop=stop)


def _bundle(args) -> int:
    dest = args.dest or str(bundled_dir() / args.name)
    fn = bundle_checkpoint if args.trainer == "bundle" else bundle_latent
    path = fn(args.run, dest, name=args.name,
              dtype=torch.float16 if args.float16 else torch.float32)
    print(f"bundled {args.run} -> {path}")
    return 0


def cmd_train(args) -> int:
    """Run the trainer ``args.trainer`` (see the module docstring)."""
    if args.trainer in ("bundle", "latent-bundle"):
        return _bundle(args)
    if args.trainer == "export-state":
        print(f"{args.run} -> {export_state(args.run, args.dest)}")
        return 0
    if args.trainer == "import-state":
        print(f"{args.state} -> {import_state(args.state, args.out)}")
        return 0
    with _stop_on_signals() as stop:
        run = _run_kwargs(args, stop)
        if args.trainer == "autoencoder":
            ds = _slice_dataset(args)
            model = AutoEncoder(channels=1, latent_channels=args.latent_channels, base=args.base,
                                channel_mults=_ints(args.channel_mults),
                                num_res_blocks=args.num_res_blocks, image_size=args.image_size)
            print(f"{len(ds)} training slices, autoencoder {model.num_parameters():,} "
                  f"parameters, latent {model.latent_shape(args.image_size)}", flush=True)
            res = train_autoencoder(ds, model=model, crop=args.crop, noise=args.noise,
                                    beta=args.beta, name=args.name + "-autoencoder", **run)
        elif args.trainer == "latent-flow":
            velocity = dict(base=args.base, channel_mults=_ints(args.channel_mults),
                            num_res_blocks=args.num_res_blocks,
                            attention_levels=_ints(args.attention_levels))
            res = train_latent_flow(_slice_dataset(args), autoencoder=args.autoencoder,
                                    repeats=args.repeats, velocity_config=velocity,
                                    hu_window=_floats(args.hu_window), name=args.name,
                                    coupling=args.coupling, time_sampling=args.time_sampling,
                                    log=lambda line: print(line, flush=True), **run)
        else:
            ds, hu_window = _prior_dataset(args)
            channels = int(ds.sample(1, torch.Generator().manual_seed(0)).shape[1])
            model = UNet(channels=channels, base=args.base,
                         channel_mults=_ints(args.channel_mults),
                         num_res_blocks=args.num_res_blocks,
                         attention_levels=_ints(args.attention_levels),
                         image_size=None if args.trainer == "patches" else args.image_size,
                         norm=args.norm, mid_attention=not args.no_mid_attention)
            print(f"{len(ds)} training images, model {model.num_parameters():,} parameters, "
                  f"out {args.out}", flush=True)
            res = train_prior(ds, model=model, weight_decay=args.weight_decay,
                              coupling=args.coupling, time_sampling=args.time_sampling,
                              keep_every=args.keep_every, hu_window=hu_window, name=args.name,
                              channels_last=args.channels_last, autocast=args.autocast, **run)
    print(f"step {res.step} loss {res.final_loss} wall {res.seconds:.0f} s "
          f"checkpoint {res.checkpoint}", flush=True)
    return 0
