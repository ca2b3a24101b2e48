"""The problem set-up of :mod:`ctflow.tasks` and the conventions of the DICOM task: the noise
model (zero noise for the methods that do not need sigma, refused for the others), the method
registry (landweber without a prior), ``map_slices``, and the layering (tasks never import the
distributed layer, the CLI or training)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ctflow.operators.noise import GaussianNoise

REPO = Path(__file__).resolve().parents[1]
CHEST = REPO / "ctflow" / "data" / "samples" / "chest-subset"
FAST = dict(prior=None, size=16, views=10, progress=False)


def chest_copy(folder: Path, *, air: bool = False) -> Path:
    """Two chest slices copied into ``folder``; ``air``: with every pixel set to -1024 HU (an
    all-air slice, a zero working image)."""
    folder.mkdir()
    for f in sorted(CHEST.glob("*.dcm"))[:2]:
        ds = pydicom.dcmread(f)
        if air:
            slope = float(ds.get("RescaleSlope", 1))
            intercept = float(ds.get("RescaleIntercept", 0))
            ds.PixelData = np.full(ds.pixel_array.shape, round((-1024 - intercept) / slope),
                                   dtype=ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f.name)
    return folder


@pytest.fixture()
def series(tmp_path):
    return chest_copy(tmp_path / "in")


@pytest.fixture()
def air_series(tmp_path):
    return chest_copy(tmp_path / "air", air=True)


def test_zero_noise_on_an_all_air_slice(air_series, tmp_path):
    """Relative noise 0 (sigma 0) on an all-air slice: y = 0 exactly; FBP, TV, CGLS and
    Landweber (registry needs_sigma False) accept it and reconstruct zero."""
    from ctflow.tasks import reconstruct_dicom

    s = reconstruct_dicom(air_series, tmp_path / "fbp", method="fbp",
                          noise=GaussianNoise(relative=0.0), **FAST)
    assert s["status"] == "complete" and s["slices_reconstructed"] == 2
    assert s["settings"]["noise"] == {"model": "gaussian", "relative": 0.0}
    for r in s["slices"]:
        assert r["noise_sigma"] == 0.0
        ds = pydicom.dcmread(tmp_path / "fbp" / r["output_file"])
        from pydicom.pixels import apply_rescale
        assert np.abs(apply_rescale(ds.pixel_array, ds) + 1024).max() <= 0.5
    # 1 % of the RMS of zero data is sigma 0 as well: the classical methods all run.
    for method, opts in (("tv", {"iterations": 5}), ("cgls", {"iterations": 3}),
                         ("landweber", {"iterations": 3})):
        s = reconstruct_dicom(air_series, tmp_path / method, method=method,
                              noise=GaussianNoise(relative=0.01), slices=(0, 1), **FAST,
                              **opts)
        assert s["slices"][0]["noise_sigma"] == 0.0 and s["status"] == "complete"


def test_methods_that_need_sigma_refuse_zero_noise_before_any_work(series, tmp_path):
    from ctflow.tasks import check_noise, reconstruct_dicom

    for noise in (GaussianNoise(relative=0.0), GaussianNoise(sigma=0.0)):
        with pytest.raises(ValueError, match=r"'msflow' needs a noise standard deviation > 0"):
            reconstruct_dicom(series, tmp_path / "o", method="msflow", prior="ct64",
                              noise=noise, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(TypeError, match="GaussianNoise"):
        reconstruct_dicom(series, tmp_path / "o", method="fbp", noise=0.01, **FAST)
    with pytest.raises(TypeError):                          # the old name is gone
        reconstruct_dicom(series, tmp_path / "o", method="fbp", noise_level=0.01, **FAST)
    assert not (tmp_path / "o").exists()
    assert check_noise("fbp", GaussianNoise(sigma=0.0)) == GaussianNoise(sigma=0.0)


def test_absolute_sigma_is_recorded_and_used(series, tmp_path):
    from ctflow.tasks import reconstruct_dicom

    s = reconstruct_dicom(series, tmp_path / "a", method="fbp",
                          noise=GaussianNoise(sigma=0.25), **FAST)
    assert [r["noise_sigma"] for r in s["slices"]] == [0.25, 0.25]
    assert s["settings"]["noise"] == {"model": "gaussian", "sigma": 0.25}
    assert "sigma 0.25" in s["settings"]["series_description"]
    # resume compares the noise model: another sigma is another run
    with pytest.raises(ValueError, match="different settings .*noise"):
        reconstruct_dicom(series, tmp_path / "a", method="fbp", resume=True,
                          noise=GaussianNoise(sigma=0.5), **FAST)


def test_landweber_is_classical_and_never_gets_the_prior(series, tmp_path):
    """A method without needs_prior runs with prior=None; a prior given to it only sets the
    window and the size, and is not handed to map_slices (no worker loads it)."""
    from ctflow.priors.base import FlowPrior
    from ctflow.flow.gaussian import GaussianVelocity
    from ctflow.tasks import make_ct_operator, reconstruct_dicom, solve_slice

    s = reconstruct_dicom(series, tmp_path / "lw", method="landweber", iterations=3, **FAST)
    assert s["status"] == "complete"
    assert "landweber" in s["settings"]["series_description"]

    prior = FlowPrior(GaussianVelocity(torch.full((1, 16, 16), 0.3), torch.full((1, 16, 16), 0.2)),
                      image_size=16, scale=1.0, shift=0.0, hu_window=(-1000.0, 1000.0),
                      name="gaussian-test")
    seen = {}

    class Mapper:
        """An in-process ``map_slices`` (what a remote executor does, minus the remote)."""

        def __call__(self, jobs, spec, prior_spec):
            seen.update(spec=spec, prior=prior_spec, keys=[j["key"] for j in jobs])
            for job in reversed(jobs):          # any order: results are keyed
                op = make_ct_operator(spec["size"], spec["views"], geometry=spec["geometry"])
                yield job["key"], solve_slice(
                    job["x"], operator=op, prior=prior_spec, method=spec["method"],
                    noise=spec["noise"], seed=spec["seed"], key=job["key"],
                    hu_shape=job["hu_shape"], window=tuple(spec["window"]),
                    measured=job["measured"], **spec["options"])

        def describe(self):
            return {"mapper": "test"}

    kw = dict(FAST, prior=prior, method="landweber", iterations=3)
    a = reconstruct_dicom(series, tmp_path / "here", **kw)
    b = reconstruct_dicom(series, tmp_path / "mapped", map_slices=Mapper(), **kw)
    assert seen["prior"] is None and isinstance(seen["spec"]["noise"], GaussianNoise)
    assert seen["spec"]["window"] == [-1000.0, 1000.0] and seen["spec"]["device"] == "auto"
    assert a["executor"] == "in-process" and b["executor"] == {"mapper": "test"}
    assert [r["psnr"] for r in a["slices"]] == [r["psnr"] for r in b["slices"]]
    assert a["settings"]["prior"] == b["settings"]["prior"] == "gaussian-test"
    assert "gaussian-test" not in a["settings"]["series_description"]
    assert json.loads((tmp_path / "mapped" / "summary.json").read_text())["status"] == "complete"


def test_hu_preparation_equals_the_training_data():
    """to_working_size(HU, n, hu_window) is CTSliceDataset's preparation without augmentation
    (the priors are trained on exactly these images)."""
    from ctflow.tasks import to_working_size
    from ctflow.training.datasets import CTSliceDataset

    rng = np.random.default_rng(0)
    for shape, n in (((50, 40), 16), ((64, 64), 32), ((32, 32), 16), ((20, 30), 24)):
        hu = rng.uniform(-2048, 2000, size=shape).astype(np.float32)
        ref = CTSliceDataset([hu], image_size=n, hu_window=(-1024, 1024), augment=False)[0][0]
        torch.testing.assert_close(to_working_size(hu, n, hu_window=(-1024, 1024)), ref,
                                   atol=0, rtol=0)


def test_tasks_import_no_higher_layer():
    code = ("import sys\nimport ctflow.tasks\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('ctflow.distributed', "
            "'ctflow.cli', 'ctflow.training')))\nassert not bad, bad\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
