"""PSNR / SSIM / relative error against scikit-image and closed forms."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ctflow.metrics import psnr, relative_error, ssim


def pair(shape, seed, noise=0.1, scale=1.0):
    rng = np.random.default_rng(seed)
    ref = rng.random(shape) * scale
    # a smooth structure plus noise, so SSIM is far from both 0 and 1
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[-2]), np.linspace(0, 1, shape[-1]),
                         indexing="ij")
    ref = 0.5 * ref + 0.5 * scale * np.sin(6 * yy) * np.cos(4 * xx) ** 2
    x = ref + noise * scale * rng.standard_normal(shape)
    return x, ref


def sk_ssim(x, ref, data_range, channel_axis=None):
    return structural_similarity(x, ref, data_range=data_range, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False,
                                 channel_axis=channel_axis)


@pytest.mark.parametrize("shape", [(32, 32), (23, 41), (11, 11)])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_single_image_matches_skimage(shape, data_range):
    x, ref = pair(shape, seed=sum(shape), scale=data_range)
    s = ssim(torch.tensor(x), torch.tensor(ref), data_range=data_range)
    p = psnr(torch.tensor(x), torch.tensor(ref), data_range=data_range)
    assert isinstance(s, float) and isinstance(p, float)
    assert abs(s - sk_ssim(x, ref, data_range)) <= 1e-3
    assert abs(p - peak_signal_noise_ratio(ref, x, data_range=data_range)) <= 1e-3
    assert 0.2 < s < 0.95                                     # a non-trivial comparison


def test_batched_per_image_matches_skimage():
    x, ref = pair((3, 2, 24, 30), seed=1, noise=0.15)
    # vary the noise level per image so the values differ
    x = ref + (x - ref) * np.array([0.5, 1.0, 2.0])[:, None, None, None]
    s = ssim(torch.tensor(x), torch.tensor(ref))
    p = psnr(torch.tensor(x), torch.tensor(ref))
    assert s.shape == (3,) and p.shape == (3,) and s.dtype == torch.float64
    for b in range(3):
        sk = sk_ssim(x[b], ref[b], 1.0, channel_axis=0)      # mean over channels
        assert abs(float(s[b]) - sk) <= 1e-3
        assert abs(float(p[b]) - peak_signal_noise_ratio(ref[b], x[b], data_range=1.0)) <= 1e-3
    assert s[0] > s[1] > s[2] and p[0] > p[1] > p[2]


def test_float32_matches_skimage():
    x, ref = pair((40, 36), seed=5)
    x32, r32 = x.astype(np.float32), ref.astype(np.float32)
    s = ssim(torch.from_numpy(x32)[None, None], torch.from_numpy(r32)[None, None])
    assert s.dtype == torch.float32
    assert abs(float(s[0]) - sk_ssim(x, ref, 1.0)) <= 1e-3
    p = psnr(torch.from_numpy(x32), torch.from_numpy(r32))
    assert abs(p - peak_signal_noise_ratio(ref, x, data_range=1.0)) <= 1e-3


def test_numpy_inputs_accepted():
    x, ref = pair((16, 16), seed=2)
    assert ssim(x, ref) == pytest.approx(ssim(torch.tensor(x), torch.tensor(ref)), abs=1e-15)
    assert relative_error(x, ref) == pytest.approx(np.linalg.norm(x - ref) / np.linalg.norm(ref),
                                                   rel=1e-12)


def test_closed_forms():
    ref = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)
    assert torch.all(ssim(ref, ref) == 1.0)
    assert torch.all(torch.isinf(psnr(ref, ref)))
    assert torch.all(relative_error(ref, ref) == 0.0)
    # a constant offset d gives MSE = d^2: PSNR = -20 log10(d) for data range 1
    torch.testing.assert_close(psnr(ref + 0.1, ref), torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(psnr(2 * (ref + 0.1), 2 * ref, data_range=2.0),
                               torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(relative_error(1.5 * ref, ref),
                               torch.full((2,), 0.5, dtype=torch.float64))
    # SSIM is symmetric and invariant to scaling the data range with the images
    x = ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)
    torch.testing.assert_close(ssim(x, ref), ssim(ref, x))
    torch.testing.assert_close(ssim(255 * x, 255 * ref, data_range=255.0), ssim(x, ref))


def test_ssim_is_differentiable():
    ref = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    x = (ref + 0.1).requires_grad_()
    s = ssim(x, ref)
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    p = psnr(x, ref)
    assert p.requires_grad


def test_errors():
    a = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(8, 8\).*\(8, 9\)"):
        psnr(a, torch.zeros(8, 9))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(H, W\).*\(1, 8, 8\)"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="smaller than the 11 x 11 window"):
        ssim(torch.zeros(10, 12), torch.zeros(10, 12))
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, data_range=0.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(12, 12), torch.zeros(12, 12), data_range=-1.0)
    assert math.isinf(relative_error(torch.ones(3, 3), torch.zeros(3, 3)))
