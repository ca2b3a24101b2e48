"""Shepp–Logan phantom and the seeded random-ellipses dataset (ctflow.data.phantoms)."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctflow.data import EllipsesDataset, ellipse_image, shepp_logan


def pixel(n, x, y):
    """(row, column) of the pixel whose centre is nearest to (x, y) on the [-1, 1]² grid."""
    return int(round((1 - y) * n / 2 - 0.5)), int(round((x + 1) * n / 2 - 0.5))


def test_modified_shepp_logan_values_and_orientation():
    n = 256
    p = shepp_logan(n)
    assert p.shape == (n, n) and p.dtype == torch.float32
    assert float(p.min()) == 0.0 and float(p.max()) == 1.0
    # Known region values: brain 1 - 0.8, ventricles 1 - 0.8 - 0.2, top blob 0.2 + 0.1.
    assert p[pixel(n, 0.0, 0.0)] == pytest.approx(0.2)
    assert p[pixel(n, 0.22, 0.0)] == pytest.approx(0.0, abs=1e-7)
    assert p[pixel(n, -0.22, 0.0)] == pytest.approx(0.0, abs=1e-7)
    assert p[pixel(n, 0.0, 0.35)] == pytest.approx(0.3)
    assert p[pixel(n, 0.0, 0.9)] == pytest.approx(1.0)  # skull at the top (row 0 is +y)
    assert p[pixel(n, 0.0, -0.9)] == pytest.approx(1.0)
    assert p[0, 0] == 0.0 and p[pixel(n, 0.0, 0.97)] == 0.0  # outside the head
    # The blob at y = +0.35 is in the upper half of the image (small row index).
    assert pixel(n, 0.0, 0.35)[0] < n // 2
    vals = set(np.round(torch.unique(p).double().numpy(), 6).tolist())
    assert vals == {0.0, 0.1, 0.2, 0.3, 0.4, 1.0}


def test_original_shepp_logan_scaled_to_unit_range():
    p = shepp_logan(128, modified=False, dtype=torch.float64)
    assert p.dtype == torch.float64 and float(p.max()) == pytest.approx(1.0)
    assert p[pixel(128, 0.0, 0.0)] == pytest.approx((2.0 - 0.98) / 2)


def test_ellipse_area_converges():
    # Pixel-centre sampling of an ellipse: area fraction -> pi a b / 4 on [-1, 1]^2.
    img = ellipse_image(400, [(1.0, 0.5, 0.25, 0.1, -0.2, 30.0)], dtype=torch.float64)
    assert float(img.mean()) == pytest.approx(np.pi * 0.5 * 0.25 / 4, rel=1e-2)


def test_ellipses_dataset_is_deterministic_and_in_range():
    ds = EllipsesDataset(32, seed=7, length=10)
    assert len(ds) == 10 and len(EllipsesDataset(16)) == 1_000_000
    a, b = ds[3], EllipsesDataset(32, seed=7)[3]
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same (seed, index), fresh object
    assert not torch.equal(a, ds[4])
    assert not torch.equal(a, EllipsesDataset(32, seed=8)[3])
    big = ds[10**9]  # unbounded: any index, whatever the length
    assert big.shape == (1, 32, 32)
    for i in range(6):
        x = ds[i]
        assert float(x.min()) >= 0.0 and float(x.max()) == pytest.approx(1.0)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.shape == (4, 1, 32, 32) and torch.equal(batch[3], a)
    with pytest.raises(IndexError):
        ds[-1]
    with pytest.raises(ValueError):
        EllipsesDataset(0)
