"""Geometry presets in mm (issue 17): cited values, the problem set-up and the CLI's
``--geometry`` presets and ``--dose``."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from ctflow.operators.ct import (PRESETS, FanBeam2D, ParallelBeam2D, check_field_of_view, preset,
                                 preset_names)
from ctflow.operators.ct.presets import scan_fov_radius
from ctflow.tasks import FAN_DISTANCES, infer_size, make_ct_operator
from ctflow.tasks.problem import geometry_names
from tests.helpers import cli  # noqa: F401  (fixture)


def test_clinical_fan_preset_values():
    """SOMATOM Definition AS: SOD 595, SDD 1085.6, 736 channels spanning the fan of 736
    arcs of 1.2858 mm (a 50 cm scan field of view), 1152 views; 512² pixels of 0.7 mm."""
    g = preset("clinical-fan", 512)
    assert isinstance(g, FanBeam2D)
    assert g.source_origin == 595.0 and g.source_origin + g.origin_detector == pytest.approx(1085.6)
    assert g.detectors == 736 and g.num_angles == 1152
    assert g.pixel_size == pytest.approx(0.7) and g.extent == pytest.approx(179.2)
    half_fan = 0.5 * 736 * 1.2858 / 1085.6
    assert math.atan(0.5 * 736 * g.detector_spacing / 1085.6) == pytest.approx(half_fan)
    assert 2 * scan_fov_radius(g) == pytest.approx(2 * 595 * math.sin(half_fan))
    assert 2 * scan_fov_radius(g) == pytest.approx(502.4, abs=0.1)
    assert preset("clinical-fan", 64, views=96).pixel_size == pytest.approx(358.4 / 64)


def test_lodopab_preset_values():
    g = preset("lodopab-parallel", 362)
    assert isinstance(g, ParallelBeam2D)
    assert g.detectors == 513 and g.num_angles == 1000
    assert 2 * g.extent == pytest.approx(260.0)
    assert g.detectors * g.detector_spacing == pytest.approx(2 * math.sqrt(2) * 130.0)
    a = g.angles
    assert float(a[0]) == pytest.approx(0.5 * math.pi / 1000)   # ODL's midpoints
    assert float(a[-1]) == pytest.approx(math.pi - 0.5 * math.pi / 1000)
    assert set(preset_names()) == set(PRESETS) == {"clinical-fan", "lodopab-parallel"}


def test_preset_bad_inputs():
    with pytest.raises(ValueError, match="unknown geometry preset 'helical'"):
        preset("helical", 64)
    with pytest.raises(ValueError, match="views must be an int >= 1, got 0"):
        preset("clinical-fan", 64, views=0)
    with pytest.raises(ValueError, match=r"image_size must be an int >= 1, got 0"):
        preset("clinical-fan", 0)
    narrow = FanBeam2D(32, 8, source_origin=600.0, origin_detector=500.0, extent=150.0,
                       detectors=100, detector_spacing=1.0)
    with pytest.raises(ValueError, match=r"100 bins.*diameter 5\d\.\d+, smaller than the "
                                         r"image's 300"):
        check_field_of_view(narrow)
    assert check_field_of_view(preset("lodopab-parallel", 64)) is not None


def test_make_ct_operator_defaults_unchanged_and_presets():
    assert make_ct_operator(16, 10).geometry == ParallelBeam2D(16, 10)
    assert make_ct_operator(16, 10, geometry="fan").geometry == FanBeam2D(16, 10, **FAN_DISTANCES)
    op = make_ct_operator(32, 48, geometry="clinical-fan", pixel_mm=8.0)
    assert op.geometry == preset("clinical-fan", 32, 8.0, 48)
    assert make_ct_operator(32, None, geometry="lodopab-parallel").geometry.num_angles == 1000
    g = make_ct_operator(16, 10, geometry="fan", pixel_mm=2.0).geometry
    assert g.extent == 16.0 and g.source_origin == 4.0 * 16.0
    with pytest.raises(ValueError, match="views=None"):
        make_ct_operator(16, None)
    with pytest.raises(ValueError, match="pixel_mm must be a finite number > 0, got -1"):
        make_ct_operator(16, 10, pixel_mm=-1.0)
    with pytest.raises(ValueError, match="geometry must be one of parallel, fan, clinical-fan"):
        make_ct_operator(16, 10, geometry="cone")
    with pytest.raises(ValueError, match="fixed detector"):
        infer_size(60, 736, geometry="clinical-fan")
    assert geometry_names() == ("parallel", "fan", "clinical-fan", "lodopab-parallel")


# ---------------------------------------------------------------------- command line
def test_cli_dose_is_exclusive_with_gaussian_noise(cli, tmp_path):
    img = tmp_path / "img.npy"
    np.save(img, np.zeros((16, 16), np.float32))
    r = cli("reconstruct", img, "-o", tmp_path / "o.npy", "--dose", "1e4", "--sigma", "0.1",
            "--method", "fbp")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = cli("reconstruct", img, "-o", tmp_path / "o.npy", "--dose", "0", "--method", "fbp",
            "--geometry", "clinical-fan")
    assert r.returncode == 2 and "--dose" in r.stderr and "I0" in r.stderr and "got 0" in r.stderr
    r = cli("reconstruct", img, "-o", tmp_path / "o.npy", "--dose", "1e4", "--method", "fbp")
    assert r.returncode == 2 and "--dose needs physical units" in r.stderr


def test_cli_reconstruct_with_dose_on_the_clinical_preset(cli, tmp_path):
    """An image in [0, 1] scanned on the clinical fan preset at I0 = 1e4 and reconstructed by
    weighted CGLS; the settings record the geometry, the dose and the units."""
    n = 32
    yy, xx = np.mgrid[:n, :n]
    disc = ((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 < (0.35 * n) ** 2)
    img = np.where(disc, 0.25, 0.0).astype(np.float32)   # 0.25 of [-1024, 3071]: water
    src = tmp_path / "img.npy"
    np.save(src, img)
    out = tmp_path / "rec.h5"
    r = cli("reconstruct", src, "-o", out, "--geometry", "clinical-fan", "--views", "64",
            "--dose", "1e4", "--method", "cgls", "--quiet")
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        rec = f["reconstruction"][()]
        assert json.loads(f.attrs["noise"])["I0"] == 1e4
        assert f.attrs["geometry"] == "clinical-fan"
        assert json.loads(f.attrs["units"])["hu_window"] == [-1024.0, 3071.0]
        assert f.attrs["pixel_mm"] == pytest.approx(358.4 / n)
        metrics = json.loads(f.attrs["metrics"])
    assert metrics[0]["sigma"] == 1.0
    inside = torch.from_numpy(rec)[torch.from_numpy(disc)]
    assert abs(float(inside.mean()) - 0.25) < 0.02
