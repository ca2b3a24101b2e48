"""reconstruct-dicom with a clinical fan-beam preset and a low dose (issue 17): the scan is
simulated in physical units with Poisson counts, reconstructed with the statistical weights,
and the geometry, dose and noise model are recorded in summary.json and DerivationDescription."""
from __future__ import annotations

import json

import pydicom
import pytest

from ctflow.cli import main
from ctflow.data import sample_path


@pytest.mark.parametrize("method", ["tv", "msflow"])
def test_clinical_fan_low_dose_series(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--size", "64", "--option", "weight=0.05"] if method == "tv" else \
        ["--option", "K=2", "--option", "M=1", "--option", "sweeps=1"]
    rc = main(["--quiet", "--threads", "1", "reconstruct-dicom", "sample:chest-subset", "out",
               "--geometry", "clinical-fan", "--dose", "1e4", "--views", "96",
               "--slices", "0:1", "--method", method, *extra])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    s = summary["settings"]
    assert s["geometry"] == "clinical-fan" and s["dose_I0"] == 1e4
    assert s["noise"]["model"] == "poisson" and "Poisson" in s["noise_model"]
    src = pydicom.dcmread(sorted(sample_path("chest-subset").glob("*.dcm"))[0])
    n = s["size"]
    assert s["pixel_mm"] == pytest.approx(src.Columns * float(src.PixelSpacing[1]) / n)
    assert summary["slices"][0]["psnr"] > 15
    (f,) = sorted((tmp_path / "out").glob("*.dcm"))
    desc = pydicom.dcmread(f).DerivationDescription
    assert "clinical-fan" in desc and "dose I0 10000" in desc


def test_dose_with_a_measured_sinogram_is_refused(tmp_path):
    import numpy as np
    np.save(tmp_path / "s.npy", np.zeros((6, 60, 91), np.float32))
    rc = main(["--quiet", "reconstruct-dicom", "sample:chest-subset", str(tmp_path / "o"),
               "--dose", "1e4", "--sinogram", str(tmp_path / "s.npy"), "--method", "fbp"])
    assert rc == 2 and not (tmp_path / "o").exists()
