"""``ctflow reconstruct-dicom``: a DICOM series slice by slice into a derived DICOM series
(:func:`ctflow.tasks.reconstruct_dicom`; with ``--ray`` the slices are Ray tasks,
:func:`ctflow.distributed.ray_slice_mapper`)."""
from __future__ import annotations

import inspect

from ctflow.cli.common import (CLIError, add_command, add_ray_arguments, add_solver_arguments,
                               default_prior, input_path, noise_from_args, parse_options,
                               parse_slices,
                               ray_settings)
from ctflow.distributed import ray_slice_mapper
from ctflow.tasks import reconstruct_dicom

__all__ = ["register", "cmd_reconstruct_dicom"]

EPILOG = """\
For each slice of the series in IN_DIR: clip HU to [-1024, 3071], window with the prior's HU
window into [0, 1] (HU outside the window are clipped and do not come back), resize to the
working size, simulate a sparse-view measurement (seeded per slice; --noise-rel ETA, default
0.01, or --sigma S) or take it from --sinogram (then sigma = ETA * RMS of the measured
sinogram, or S), reconstruct, map back to HU at the original matrix size and write a derived
DICOM slice to OUT_DIR on the input's grid (ImageType DERIVED/SECONDARY/AXIAL, plus RESAMPLED
when the working size differs from the input's; DerivationDescription and summary.json "grid"
state the working grid). Every run writes a new series (new UIDs, its own SeriesNumber) unless
--stable-uids; files are named <InstanceNumber>-<SOPInstanceUID>.dcm.
OUT_DIR also receives summary.json (settings, per-slice PSNR/SSIM
against the windowed, resized input, means, versions, timing) and montage.png. Inputs are
never modified; OUT_DIR must differ from IN_DIR; existing outputs are never overwritten.

examples:
  ctflow reconstruct-dicom chest/ chest-msflow/ --slices 20:30 --views 60 --size 64
  ctflow reconstruct-dicom chest/ chest-fbp/ --method fbp --size 128
  ctflow reconstruct-dicom chest/ chest-msflow/ --resume      # continue after a stop
  ctflow reconstruct-dicom chest/ out/ --sinogram measured.npy --method tv
  ctflow reconstruct-dicom chest/ out/ --ray              # a private local Ray instance
  ctflow reconstruct-dicom chest/ out/ --ray auto --resume   # the cluster of 'ray start'

With --ray each slice is a Ray task (one CPU; one GPU when the cluster has GPUs and --device
is not cpu; one torch thread). This process writes every finished slice, atomically and keyed
by its SOPInstanceUID, so a task re-run after its worker died is written once, and --resume
works as without Ray. The reconstructions equal the in-process ones (same seeds).
"""


def register(sub) -> None:
    """Add ``reconstruct-dicom`` to the sub-parsers ``sub``."""
    p = add_command(sub, "reconstruct-dicom", "reconstruct a DICOM series slice by slice into "
                    "a derived DICOM series", EPILOG, cmd_reconstruct_dicom)
    p.add_argument("in_dir", metavar="IN_DIR", help="folder holding one CT series "
                   "(sample:chest-subset: the bundled chest slices)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the derived series "
                   "(created; must differ from IN_DIR)")
    add_solver_arguments(p)
    p.add_argument("--slices", default=None, metavar="START:STOP",
                   help="slice range, 0-based in anatomical order, STOP exclusive (e.g. 10:20)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip slices whose output exists")
    p.add_argument("--preset", choices=("recommended", "paper"), default=None,
                   help="solver settings without --option: 'recommended' (the default: the "
                        "prior's tuned settings, recorded in summary.json) or 'paper' (the "
                        "solver's defaults)")
    p.add_argument("--stable-uids", action="store_true",
                   help="derive the SeriesInstanceUID and SOPInstanceUIDs from the input and "
                        "the settings (the same in every run); by default every run writes a "
                        "new series (--resume always adds to the series it continues)")
    p.add_argument("--sinogram", default=None, metavar="FILE",
                   help="measured sinograms (.npy/.h5, shape (Z, views, detectors)) instead "
                        "of simulating them")
    add_ray_arguments(p, "slices")


def cmd_reconstruct_dicom(args) -> int:
    """Run ``ctflow reconstruct-dicom`` (see :data:`EPILOG`)."""
    name = args.method
    noise = noise_from_args(args, name)
    options = parse_options(args.option)
    own = set(inspect.signature(reconstruct_dicom).parameters) - {"options"}
    clash = sorted(set(options) & own)
    if clash:
        raise CLIError(f"--option {clash[0]}=...: set it with the command's own option "
                       f"--{clash[0].replace('_', '-')}")
    ray = ray_settings(args)
    summary = reconstruct_dicom(
        input_path(args.in_dir), args.out_dir, views=args.views, geometry=args.geometry, noise=noise,
        method=name, prior=default_prior(name, args.prior), size=args.size,
        slices=parse_slices(args.slices),
        # on Ray the tasks pick their device on their own node (main() resolved it otherwise)
        device=args.device if ray is None else args.device_requested,
        resume=args.resume, stable_uids=args.stable_uids, preset=args.preset, seed=args.seed,
        progress=not args.quiet, sinogram=args.sinogram,
        backend=args.backend, map_slices=None if ray is None else ray_slice_mapper(ray),
        **options)
    m = summary.get("mean", {})
    done, skipped = summary.get("slices_reconstructed", 0), summary.get("slices_skipped", 0)
    line = f"{done} slice(s) reconstructed, {skipped} skipped (resume) -> {args.out_dir}"
    if m.get("psnr") is not None:
        line += f"; mean PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}"
    print(line)
    return 0
