"""Restoration operators: adjoints, exact shifted-normal solves, masks, shapes, dtype/device."""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from ctflow.operators import Denoising, GaussianBlur, Inpainting, LinearOperator, SuperResolution
from ctflow.operators.restoration import box_mask, freeform_mask, random_mask


def blur_configs():
    return [
        GaussianBlur(16, sigma=1.0),
        GaussianBlur((15, 21), sigma=1.5),
        GaussianBlur((9, 7), sigma=3.0),                       # kernel (19x19) wraps the torus
        GaussianBlur((12, 11), sigma=(0.7, 2.0), kernel_size=(5, 9)),
        GaussianBlur(16, sigma=1.0, boundary="zero"),
        GaussianBlur((15, 21), sigma=2.0, boundary="zero"),
        GaussianBlur((11, 13), sigma=(1.0, 0.5), kernel_size=7, boundary="zero"),
    ]


def inpainting_configs():
    custom = (torch.arange(13 * 10).reshape(13, 10) % 3 != 0).to(torch.float32)
    return [
        Inpainting(16, kind="random", fraction=0.3, seed=1),
        Inpainting((15, 21), kind="random", fraction=0.7, seed=2),
        Inpainting((15, 21), kind="box"),
        Inpainting((17, 12), kind="box", box_size=(5, 3), position="random", seed=4),
        Inpainting((15, 21), kind="freeform", fraction=0.3, seed=5),
        Inpainting(32, kind="freeform", seed=6),
        Inpainting((13, 10), mask=custom),
    ]


def sr_configs():
    return [
        SuperResolution(16, factor=2, mode="average"),
        SuperResolution(16, factor=4, mode="average"),
        SuperResolution((12, 20), factor=4, mode="average"),
        SuperResolution((15, 21), factor=3, mode="average"),
        SuperResolution(16, factor=2, mode="decimate"),
        SuperResolution((12, 20), factor=4, mode="decimate"),
        SuperResolution((15, 21), factor=3, mode="decimate"),
        SuperResolution((6, 10), factor=1, mode="decimate"),
    ]


def all_configs():
    return (blur_configs() + inpainting_configs() + sr_configs()
            + [Denoising(16), Denoising((7, 9))])


ALL = all_configs()


def dense(op: LinearOperator) -> torch.Tensor:
    """The operator's matrix (float64), built column by column from basis images."""
    n = math.prod(op.domain_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *op.domain_shape)
    return op(basis).reshape(n, -1).T


def rand(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("op", ALL, ids=repr)
@pytest.mark.parametrize("shift", [1e-3, 0.1, 1.0, 10.0])
def test_shifted_normal_solve_exact(op, shift):
    b = rand((2, 2, *op.domain_shape), seed=7)
    x = op.solve_shifted_normal(b, shift)
    if isinstance(op, GaussianBlur) and op.boundary == "zero":
        assert x is None                                     # no closed form: callers use CG
        return
    assert x.shape == b.shape and x.dtype == b.dtype
    residual = op.normal(x) + shift * x - b
    assert float(residual.norm() / b.norm()) <= 1e-8


@pytest.mark.parametrize("op", [o for o in ALL if not isinstance(o, GaussianBlur)], ids=repr)
def test_solve_matches_dense_inverse(op):
    M = dense(op)
    b = rand((1, 1, *op.domain_shape), seed=8)
    x = op.solve_shifted_normal(b, 0.25)
    ref = torch.linalg.solve(M.T @ M + 0.25 * torch.eye(M.shape[1], dtype=M.dtype), b.flatten())
    torch.testing.assert_close(x.flatten(), ref, rtol=1e-10, atol=1e-10)


def test_solve_shift_zero_and_bad_input():
    b = rand((1, 1, 8, 8))
    assert Inpainting(8, kind="box").solve_shifted_normal(b, 0.0) is None        # singular
    full = Inpainting(8, mask=torch.ones(8, 8))
    torch.testing.assert_close(full.solve_shifted_normal(b, 0.0), b)
    torch.testing.assert_close(Denoising(8).solve_shifted_normal(b, 0.0), b)
    assert SuperResolution(8, factor=2).solve_shifted_normal(b, 0.0) is None
    torch.testing.assert_close(SuperResolution(8, factor=1).solve_shifted_normal(b, 0.0), b)
    for op in (GaussianBlur(8, sigma=1.0), Inpainting(8), SuperResolution(8, factor=2),
               Denoising(8)):
        with pytest.raises(ValueError, match="shift"):
            op.solve_shifted_normal(b, -1.0)
        with pytest.raises(ValueError, match=r"expected \(B, C, 8, 8\).*got \(1, 1, 8, 9\)"):
            op.solve_shifted_normal(rand((1, 1, 8, 9)), 1.0)


@pytest.mark.parametrize("op", [o for o in ALL if o.domain_shape[0] * o.domain_shape[1] <= 260],
                         ids=repr)
def test_norm_is_largest_singular_value(op):
    sv = float(torch.linalg.svdvals(dense(op))[0])
    assert abs(op.norm() - sv) <= 1e-6 * sv


# ---------------------------------------------------------------------------- blur
def test_blur_kernel_and_constant_image():
    for op in blur_configs():
        assert abs(float(op.kernel.sum()) - 1.0) < 1e-14
        assert torch.equal(op.kernel, op.kernel.flip(0, 1))           # symmetric Gaussian
        if op.boundary == "circular":
            c = torch.full((2, 1, *op.domain_shape), 0.37, dtype=torch.float64)
            torch.testing.assert_close(op(c), c, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(op.adjoint(c), c, rtol=1e-12, atol=1e-12)
    assert GaussianBlur(32, sigma=2.0).kernel_size == (13, 13)            # 2 * ceil(3 sigma) + 1


@pytest.mark.parametrize("boundary, mode", [("circular", "wrap"), ("zero", "constant")])
def test_blur_matches_scipy_convolution(boundary, mode):
    op = GaussianBlur((14, 19), sigma=(1.2, 0.8), boundary=boundary)
    x = rand((1, 1, 14, 19), seed=2)
    ref = ndi.convolve(x[0, 0].numpy(), op.kernel.numpy(), mode=mode, cval=0.0)
    np.testing.assert_allclose(op(x)[0, 0].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_blur_boundaries_agree_in_interior():
    x = rand((2, 3, 20, 17), seed=5)
    circ = GaussianBlur((20, 17), sigma=1.3)(x)
    zero = GaussianBlur((20, 17), sigma=1.3, boundary="zero")(x)
    r = math.ceil(3 * 1.3)                                     # kernel radius
    torch.testing.assert_close(circ[..., r:-r, r:-r], zero[..., r:-r, r:-r], rtol=1e-12,
                               atol=1e-12)
    assert not torch.allclose(circ, zero)


@pytest.mark.parametrize("boundary", ["circular", "zero"])
def test_blur_complex_input_is_linear(boundary):
    op = GaussianBlur((10, 9), sigma=1.0, boundary=boundary)
    a, b = rand((1, 1, 10, 9), 1), rand((1, 1, 10, 9), 2)
    z = torch.complex(a, b)
    for apply in (op.forward, op.adjoint):
        torch.testing.assert_close(apply(z).real, apply(a))
        torch.testing.assert_close(apply(z).imag, apply(b))
    x = op.solve_shifted_normal(z, 0.2)
    if boundary == "circular":
        assert x.is_complex()
        assert float((op.normal(x) + 0.2 * x - z).abs().max()) < 1e-12


def test_blur_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur(16, sigma=0.0)
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianBlur(16, sigma=1.0, kernel_size=4)
    with pytest.raises(ValueError, match="boundary"):
        GaussianBlur(16, sigma=1.0, boundary="reflect")
    with pytest.raises(ValueError, match="image_size"):
        GaussianBlur((16, 16, 3), sigma=1.0)
    with pytest.raises(ValueError, match="image_size"):
        GaussianBlur(0, sigma=1.0)


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("kind, extra", [("random", {}), ("freeform", {}),
                                         ("box", {"position": "random", "box_size": 7})])
def test_masks_seeded(kind, extra):
    a = Inpainting(40, kind=kind, seed=11, **extra).mask
    b = Inpainting(40, kind=kind, seed=11, **extra).mask
    c = Inpainting(40, kind=kind, seed=12, **extra).mask
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_mask_property_is_a_copy_and_binary():
    op = Inpainting(12, kind="random", fraction=0.5)
    m = op.mask
    m.zero_()
    assert float(op.mask.sum()) == 72.0
    x = rand((1, 2, 12, 12))
    torch.testing.assert_close(op(x), x * op.mask.double())


@pytest.mark.parametrize("size, fraction", [((20, 20), 0.3), ((15, 21), 0.75), ((9, 9), 0.0)])
def test_random_mask_fraction_exact(size, fraction):
    m = random_mask(size, fraction=fraction, seed=3)
    assert int((m == 0).sum()) == round(fraction * size[0] * size[1])


def test_box_mask_geometry():
    m = box_mask((20, 16), box_size=(6, 4))
    holes = (m == 0).nonzero()
    assert holes.shape[0] == 24
    assert holes[:, 0].min() == 7 and holes[:, 0].max() == 12          # centred rows
    assert holes[:, 1].min() == 6 and holes[:, 1].max() == 9           # centred columns
    assert abs(Inpainting(32, kind="box").missing_fraction - 0.25) < 1e-12
    r = box_mask((20, 16), box_size=5, position="random", seed=9)
    rows, cols = (r == 0).nonzero().unbind(1)
    assert int((r == 0).sum()) == 25 and rows.max() - rows.min() == 4 and cols.max() - cols.min() == 4
    with pytest.raises(ValueError, match="box_size"):
        box_mask((8, 8), box_size=9)
    with pytest.raises(ValueError, match="position"):
        box_mask((8, 8), position="corner")


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_freeform_fraction_and_strokes(fraction, seed):
    H = W = 64
    m = freeform_mask((H, W), fraction=fraction, seed=seed)
    missing = (m == 0)
    share = float(missing.double().mean())
    # stops once the target is reached: overshoot at most one capsule (radius <= 0.06 H,
    # length <= 0.3 H), i.e. (2 r L + pi r^2) / (H W) < 0.05, plus pixelisation slack
    assert fraction <= share <= fraction + 0.06
    # strokes, not salt-and-pepper: nearly every missing pixel has a missing 4-neighbour
    p = torch.nn.functional.pad(missing[None, None].float(), (1, 1, 1, 1))[0, 0]
    nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    assert float((nb[missing] > 0).double().mean()) > 0.97


def test_inpainting_bad_arguments():
    with pytest.raises(ValueError, match=r"mask shape mismatch: expected \(8, 8\), got \(8, 7\)"):
        Inpainting(8, mask=torch.ones(8, 7))
    with pytest.raises(ValueError, match="0 or 1"):
        Inpainting(4, mask=torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match="not both"):
        Inpainting(4, mask=torch.ones(4, 4), fraction=0.2)
    with pytest.raises(ValueError, match="kind"):
        Inpainting(4, kind="stripes")
    with pytest.raises(ValueError, match="fraction"):
        Inpainting(4, kind="random", fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        Inpainting(4, kind="freeform", fraction=-0.1)
    np_mask = np.ones((5, 6), dtype=bool)
    np_mask[2, 3] = False
    op = Inpainting((5, 6), mask=np_mask)
    assert op.kind == "custom" and float(op.mask[2, 3]) == 0.0 and float(op.mask.sum()) == 29


# ---------------------------------------------------------------------------- super-resolution
@pytest.mark.parametrize("size, factor", [((16, 16), 2), ((16, 16), 4), ((12, 20), 4),
                                          ((15, 21), 3)])
def test_sr_shapes_and_values(size, factor):
    H, W = size
    x = rand((2, 3, H, W), seed=4)
    avg = SuperResolution(size, factor=factor, mode="average")
    dec = SuperResolution(size, factor=factor, mode="decimate")
    for op in (avg, dec):
        assert op.range_shape == (H // factor, W // factor)
        assert op(x).shape == (2, 3, H // factor, W // factor)
        assert op.adjoint(op(x)).shape == x.shape
    blocks = x.numpy().reshape(2, 3, H // factor, factor, W // factor, factor).mean(axis=(3, 5))
    np.testing.assert_allclose(avg(x).numpy(), blocks, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dec(x), x[..., ::factor, ::factor])
    # A A^T = c I
    y = rand((2, 3, H // factor, W // factor), seed=5)
    torch.testing.assert_close(avg(avg.adjoint(y)), y / factor ** 2)
    torch.testing.assert_close(dec(dec.adjoint(y)), y)
    zero_filled = dec.adjoint(y)
    assert int((zero_filled != 0).sum()) == y.numel()


def test_sr_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        SuperResolution((16, 18), factor=4)
    with pytest.raises(ValueError, match="not divisible by factor 2"):
        SuperResolution(15, factor=2)
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(16, factor=0)
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(16, factor=1.5)
    with pytest.raises(ValueError, match="mode"):
        SuperResolution(16, factor=2, mode="bicubic")


def test_denoising_identity():
    op = Denoising((5, 7))
    x = rand((3, 2, 5, 7))
    y = op(x)
    torch.testing.assert_close(y, x)
    assert y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(op.solve_shifted_normal(x, 3.0), x / 4.0)


def test_reprs_name_the_configuration():
    assert repr(GaussianBlur((8, 9), sigma=1.0)) == (
        "GaussianBlur(image_size=(8, 9), sigma=(1.0, 1.0), kernel_size=(7, 7), "
        "boundary='circular')")
    assert repr(SuperResolution(8, factor=2, mode="decimate")) == (
        "SuperResolution(image_size=(8, 8), factor=2, mode='decimate')")
    assert repr(Denoising(4)) == "Denoising(image_size=(4, 4))"
    assert repr(Inpainting(8, kind="box")).startswith("Inpainting(image_size=(8, 8), kind='box', "
                                                      "missing=0.250")


# ---------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("op", [GaussianBlur((10, 12), sigma=1.0),
                                GaussianBlur((10, 12), sigma=1.0, boundary="zero"),
                                Inpainting((10, 12), kind="freeform"),
                                SuperResolution((10, 12), factor=2),
                                SuperResolution((10, 12), factor=2, mode="decimate"),
                                Denoising((10, 12))], ids=repr)
def test_dtype_follows_input(op):
    x64 = rand((2, 1, 10, 12))
    y64 = rand((2, 1, *op.range_shape))
    out = {}
    for dtype in (torch.float32, torch.float64):
        x, y = x64.to(dtype), y64.to(dtype)
        fx, aty = op(x), op.adjoint(y)
        assert fx.dtype == dtype and aty.dtype == dtype
        s = op.solve_shifted_normal(x, 0.5)
        assert s is None or s.dtype == dtype
        out[dtype] = fx
    torch.testing.assert_close(out[torch.float32].double(), out[torch.float64], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        op(torch.ones(2, 1, 10, 12, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", [GaussianBlur((16, 20), sigma=1.5),
                                GaussianBlur((16, 20), sigma=1.5, boundary="zero"),
                                Inpainting((16, 20), kind="random"),
                                Inpainting((16, 20), kind="freeform"),
                                SuperResolution((16, 20), factor=4),
                                SuperResolution((16, 20), factor=2, mode="decimate"),
                                Denoising((16, 20))], ids=repr)
def test_cuda_matches_cpu(op):
    x = rand((2, 3, 16, 20))
    y = rand((2, 3, *op.range_shape), seed=1)
    for dtype in (torch.float32, torch.float64):
        xc, yc = x.to("cuda", dtype), y.to("cuda", dtype)
        fx, aty = op(xc), op.adjoint(yc)
        assert fx.device.type == "cuda" and fx.dtype == dtype and aty.device.type == "cuda"
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(fx.cpu().double(), op(x), **tol)
        torch.testing.assert_close(aty.cpu().double(), op.adjoint(y), **tol)
        s = op.solve_shifted_normal(xc, 0.3)
        if s is not None:
            assert s.device.type == "cuda"
            torch.testing.assert_close(s.cpu().double(), op.solve_shifted_normal(x, 0.3), **tol)
    assert op.dot_test(device="cuda") <= 1e-6
