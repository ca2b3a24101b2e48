"""``ctflow reconstruct-dicom`` / :func:`ctflow.tasks.series.reconstruct_dicom` on the bundled
chest subset (Lung-PET-CT-Dx, 512 x 512 slices): derived series, summary, montage, resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from helpers import REPO, cli, run_cli  # noqa: F401 - cli is a fixture

CHEST = REPO / "ctflow" / "data" / "samples" / "chest-subset"

# Small and fast: FBP at 32 x 32 with 20 views, no prior (window [-1024, 3071] HU).
FAST = ["--method", "fbp", "--prior", "none", "--size", "32", "--views", "20"]


@pytest.fixture()
def series(tmp_path):
    """A copy of three consecutive chest slices (inputs are never written to anyway)."""
    src = tmp_path / "in"
    src.mkdir()
    files = sorted(CHEST.glob("*.dcm"))[:3]
    assert len(files) == 3
    for f in files:
        shutil.copy2(f, src / f.name)
    return src


def dcm_files(folder: Path):
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def snapshot(folder: Path):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in dcm_files(folder)}


def test_reconstruct_dicom_cli_writes_series_and_resumes(series, tmp_path, cli):
    from ctflow.data import read_dicom_series

    before_inputs = snapshot(series)
    out = tmp_path / "out"
    # First run: the first two slices only (as if killed after slice 2 of 3).
    proc = run_cli("reconstruct-dicom", series, out, *FAST, "--slices", "0:2")
    assert proc.returncode == 0, proc.stderr
    files = dcm_files(out)
    assert len(files) == 2
    vol_in = read_dicom_series(series)
    for f in files:
        ds = pydicom.dcmread(f)  # a reader other than ours accepts each file
        assert ds.Rows == 512 and ds.Columns == 512
        assert "DERIVED" in list(ds.ImageType)
        assert "fbp" in ds.SeriesDescription
        assert ds.SeriesInstanceUID != vol_in.series_uid
        assert ds.StudyInstanceUID == vol_in.study_uid
        assert ds.pixel_array.shape == (512, 512)
    assert len({pydicom.dcmread(f).SeriesInstanceUID for f in files}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert [r["index"] for r in summary["slices"]] == [0, 1]
    assert summary["settings"]["method"] == "fbp" and summary["settings"]["size"] == 32
    assert summary["mean"]["psnr"] == pytest.approx(
        np.mean([r["psnr"] for r in summary["slices"]]))
    assert "torch" in summary["versions"]
    assert (out / "montage.png").stat().st_size > 1000

    # Without --resume an existing output folder is refused, nothing is touched.
    first = snapshot(out)
    proc = cli("reconstruct-dicom", series, out, *FAST)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == first

    # Resume with another range: slices 0-1 stay in the summary, slice 2 is added.
    proc = cli("reconstruct-dicom", series, out, *FAST, "--slices", "2:3", "--resume")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in summary["slices"]] == [0, 1, 2]
    assert summary["slices_reconstructed"] == 1 and summary["slices_skipped"] == 0
    assert snapshot(out) == dict(first, **{n: v for n, v in snapshot(out).items()
                                           if n not in first})
    (out / next(n for n in snapshot(out) if n not in first)).unlink()  # as if never done

    # Resume over the whole series: the two written slices are not redone.
    proc = cli("reconstruct-dicom", series, out, *FAST, "--resume")
    assert proc.returncode == 0, proc.stderr
    after = snapshot(out)
    assert len(after) == 3
    for name, stat in first.items():
        assert after[name] == stat  # same inode, mtime and size: not rewritten
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices_reconstructed"] == 1 and summary["slices_skipped"] == 2
    assert [r["index"] for r in summary["slices"]] == [0, 1, 2]
    assert [r["resumed"] for r in summary["slices"]] == [True, True, False]
    assert len({pydicom.dcmread(f).SeriesInstanceUID for f in dcm_files(out)}) == 1

    # A lost output (deleted) is redone, exactly once, by another --resume.
    lost = sorted(after)[1]
    (out / lost).unlink()
    proc = cli("reconstruct-dicom", series, out, *FAST, "--resume")
    assert proc.returncode == 0, proc.stderr
    final = snapshot(out)
    assert set(final) == set(after)
    assert [n for n in final if final[n] != after[n]] == [lost]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices_reconstructed"] == 1 and summary["slices_skipped"] == 2

    # Resuming with other settings is refused.
    proc = cli("reconstruct-dicom", series, out, "--method", "fbp", "--prior", "none",
                   "--size", "32", "--views", "30", "--resume")
    assert proc.returncode == 2 and "views" in proc.stderr
    assert snapshot(series) == before_inputs  # inputs untouched throughout


def test_reconstruct_dicom_refuses_bad_folders(series, tmp_path, cli):
    proc = cli("reconstruct-dicom", series, series, *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "input folder" in proc.stderr
    proc = cli("reconstruct-dicom", series, series / "sub", *FAST)
    assert proc.returncode == 2
    assert not (series / "sub").exists()
    proc = cli("reconstruct-dicom", tmp_path / "missing", tmp_path / "o", *FAST)
    assert proc.returncode == 2 and "not found" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.dcm").write_text("not dicom")
    proc = cli("reconstruct-dicom", bad, tmp_path / "o2", *FAST)
    assert proc.returncode == 2 and "x.dcm" in proc.stderr and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert not (tmp_path / "o2").exists()


def test_library_metrics_seeding_and_hu_mapping(series, tmp_path):
    """Per-slice noise depends on (seed, SOPInstanceUID) only; the summary's metrics are those
    of the reconstruction; the written HU are the window-mapped reconstruction."""
    from ctflow.data import read_dicom_series
    from ctflow.metrics import psnr, ssim
    from ctflow.operators.noise import GaussianNoise
    from ctflow.tasks import (DEFAULT_HU_WINDOW, from_working_size, make_ct_operator,
                              reconstruct_dicom, run_solver, simulate_measurement, slice_seed,
                              to_working_size)

    kw = dict(method="fbp", prior=None, size=32, views=20, progress=False)
    s_all = reconstruct_dicom(series, tmp_path / "a", slices=slice(0, 2), **kw)
    s_one = reconstruct_dicom(series, tmp_path / "b", slices=slice(1, 2), **kw)
    assert s_one["slices"][0]["psnr"] == s_all["slices"][1]["psnr"]
    assert s_one["slices"][0]["noise_sigma"] == s_all["slices"][1]["noise_sigma"]
    s_seed = reconstruct_dicom(series, tmp_path / "c", slices=slice(1, 2), seed=1, **kw)
    assert s_seed["slices"][0]["psnr"] != s_one["slices"][0]["psnr"]

    # Recompute slice 1 by hand.
    vol = read_dicom_series(series)
    lo, hi = DEFAULT_HU_WINDOW
    x = to_working_size(np.clip(vol.hu[1], -1024, 3071), 32, hu_window=(lo, hi))
    A = make_ct_operator(32, 20)
    gen = torch.Generator().manual_seed(slice_seed(0, vol.slices[1].sop_instance_uid))
    y, sigma = simulate_measurement(A, x[None, None], GaussianNoise(relative=0.01),
                                    generator=gen)
    rec = run_solver(y, A, None, method="fbp", sigma=float(sigma[0])).image
    rec = rec.reshape(32, 32).clamp(0, 1)
    r = s_all["slices"][1]
    assert r["psnr"] == pytest.approx(float(psnr(rec, x)), abs=1e-6)
    assert r["ssim"] == pytest.approx(float(ssim(rec, x)), abs=1e-6)
    ds = pydicom.dcmread(tmp_path / "a" / r["output_file"])
    from pydicom.pixels import apply_rescale
    hu_out = apply_rescale(ds.pixel_array, ds).astype(np.float64)
    expected = lo + from_working_size(rec, (512, 512)).numpy() * (hi - lo)
    assert np.abs(hu_out - expected).max() <= 0.5 + 1e-3  # int16 rounding only
    assert hu_out.min() >= lo - 0.5 and hu_out.max() <= hi + 0.5


def test_noise_convention_is_relative_rms():
    from ctflow.operators.noise import GaussianNoise
    from ctflow.tasks import make_ct_operator, simulate_measurement

    A = make_ct_operator(16, 12)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rel = GaussianNoise(relative=0.05)
    y, sigma = simulate_measurement(A, x, rel, generator=torch.Generator().manual_seed(1))
    clean = A(x)
    rms = clean.flatten(1).norm(dim=1) / clean[0].numel() ** 0.5
    torch.testing.assert_close(sigma, 0.05 * rms.double())
    noise = (y - clean).flatten(1)
    # The empirical noise standard deviation matches sigma (m = 12 * detectors samples).
    assert torch.allclose(noise.std(dim=1).double(), sigma, rtol=0.15)
    y2, _ = simulate_measurement(A, x, rel, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    # An absolute sigma is the same for every item; a bare number is refused.
    _, s_abs = simulate_measurement(A, x, GaussianNoise(sigma=0.2))
    torch.testing.assert_close(s_abs, torch.full((2,), 0.2, dtype=torch.float64))
    with pytest.raises(TypeError, match="GaussianNoise"):
        simulate_measurement(A, x, 0.05)


def test_working_size_round_trip():
    from ctflow.tasks import from_working_size, to_working_size

    # An image already at the working size is taken as it is.
    img = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_working_size(img, 16), img)

    # A constant slice stays constant through the resize (in and back out).
    x = to_working_size(np.full((40, 40), 0.25, np.float32), 16)
    assert x.shape == (16, 16)
    assert torch.allclose(x, torch.full_like(x, 0.25), atol=1e-6)
    back = from_working_size(x, (40, 40))
    assert back.shape == (40, 40) and torch.allclose(back, torch.full_like(back, 0.25), atol=1e-6)
    # HU windowing: values below the window -> 0, above -> 1.
    hu = np.array([[-2000.0, 5000.0], [0.0, 1000.0]], np.float32)
    w = to_working_size(np.kron(hu, np.ones((8, 8), np.float32)), 16, hu_window=(-1000, 1000))
    assert w[0, 0] == 0 and w[0, -1] == 1 and w[-1, 0] == pytest.approx(0.5)


def test_measured_sinogram_and_fan_geometry(series, tmp_path):
    """``sinogram=FILE`` replaces the simulation: with the noiseless sinogram of the prepared
    slices, FBP reproduces what FBP gives on the same data computed here; fan beam works too;
    a sinogram of the wrong shape is refused before anything is written."""
    from ctflow.data import read_dicom_series
    from ctflow.metrics import psnr
    from ctflow.operators.noise import GaussianNoise
    from ctflow.tasks import (DEFAULT_HU_WINDOW, make_ct_operator, reconstruct_dicom,
                              run_solver, to_working_size)

    vol = read_dicom_series(series)
    for geometry in ("parallel", "fan"):
        A = make_ct_operator(32, 24, geometry=geometry)
        xs = torch.stack([to_working_size(np.clip(vol.hu[k], -1024, 3071), 32,
                                          hu_window=DEFAULT_HU_WINDOW) for k in range(3)])
        sino = A(xs[:, None])[:, 0].numpy()
        path = tmp_path / f"sino-{geometry}.npy"
        np.save(path, sino)
        out = tmp_path / f"out-{geometry}"
        summ = reconstruct_dicom(series, out, method="fbp", prior=None, size=32, views=24,
                                 geometry=geometry, sinogram=path, progress=False,
                                 slices=slice(1, 3), noise=GaussianNoise(relative=0.001))
        assert summ["settings"]["sinogram"] == str(path.resolve())
        assert "measured" in summ["settings"]["series_description"]
        for rec, k in zip(summ["slices"], (1, 2)):
            y = torch.from_numpy(sino[k])[None, None]
            sigma = 1e-3 * float(y.norm()) / y.numel() ** 0.5   # relative to the RMS of y
            ref = run_solver(y, A, None, method="fbp",
                             sigma=sigma).image.reshape(32, 32).clamp(0, 1)
            assert rec["psnr"] == pytest.approx(float(psnr(ref, xs[k])), abs=1e-5)
            assert rec["noise_seed"] is None
            assert rec["noise_sigma"] == pytest.approx(sigma, rel=1e-5)
        assert len(dcm_files(out)) == 2
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 24, 7), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        reconstruct_dicom(series, tmp_path / "o3", method="fbp", prior=None, size=32,
                          views=24, sinogram=bad, progress=False)
    assert not (tmp_path / "o3").exists()
    np.save(bad, np.zeros((5, 24, 46), np.float32))
    with pytest.raises(ValueError, match="one per slice"):
        reconstruct_dicom(series, tmp_path / "o4", method="fbp", prior=None, size=32,
                          views=24, sinogram=bad, progress=False)


def test_killed_run_resumes_without_redoing_slices(series, tmp_path, cli):
    """SIGKILL a real run after its first slice is written, then --resume: the written slice
    is kept as it is (same inode and mtime), the others are done once, no partial file is
    visible, and the series is complete and consistent."""
    import signal
    import time

    out = tmp_path / "out"
    slow = ["--method", "tv", "--prior", "none", "--size", "24", "--views", "20",
            "--option", "iterations=300", "--option", "tol=0"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "ctflow", "--quiet", "reconstruct-dicom",
                             str(series), str(out), *slow], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and dcm_files(out):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    written = snapshot(out)
    assert 1 <= len(written) < 3
    assert all(pydicom.dcmread(out / n).pixel_array.shape == (512, 512) for n in written)
    # Without --resume the folder is refused; with it, the run completes.
    assert cli("reconstruct-dicom", series, out, *slow).returncode == 2
    res = cli("--quiet", "reconstruct-dicom", series, out, *slow, "--resume")
    assert res.returncode == 0, res.stderr
    final = snapshot(out)
    assert len(final) == 3
    for name, stat in written.items():
        assert final[name] == stat
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["slices_skipped"] == len(written)
    assert summary["slices_reconstructed"] == 3 - len(written)
    assert [r["index"] for r in summary["slices"]] == [0, 1, 2]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len({pydicom.dcmread(out / n).SeriesInstanceUID for n in final}) == 1
