"""The ``tomosipo`` ray-transform backend.

On any machine (CPU only, no tomosipo): the error paths fire before any tomosipo/ASTRA call
(stub modules whose functions fail the test when called prove it; the crash-sensitive parts run
in a subprocess), ``available_backends`` reports the reason, and the geometry conversion is
checked mathematically: the tomosipo vectors reproduce ctflow's rays, and a NumPy/torch emulation
of ASTRA's ray model on those vectors (trilinear sampling of the ``(z, y, x)`` volume along each
ray) agrees with the torch backend. With tomosipo and CUDA present, the real backend is checked
too (shapes, dot test, agreement with the torch backend, batching, autograd); otherwise those
tests are skipped with the reason.
"""
import math
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctflow.operators.ct import (FBP, FanBeam2D, ParallelBeam2D, RayTransform, available_backends,
                                 tomosipo_backend as tb, tomosipo_checks as tc)
from test_ct_helpers import shepp_logan

REPO = Path(__file__).resolve().parents[1]
PARALLEL = ParallelBeam2D(64, 48)
FAN = FanBeam2D(64, 60, source_origin=3.0, origin_detector=1.5)

# imports odl/astra for real before any test puts stub modules into sys.modules
_INFOS = {i.name: i for i in available_backends()}
_USABLE, _REASON = tb.status()
needs_tomosipo = pytest.mark.skipif(not _USABLE, reason=f"tomosipo backend unusable here: "
                                                        f"{_REASON}")


# ---------------------------------------------------------------------------------------------
# stubs: any call into them fails the test
# ---------------------------------------------------------------------------------------------
def _forbidden(name):
    def fn(*args, **kwargs):
        pytest.fail(f"{name} was called before the availability checks stopped the backend")
    return fn


def _stub_tomosipo(version="0.7.0", **overrides):
    mod = types.ModuleType("tomosipo")
    mod.__version__ = version
    for name in ("volume", "parallel", "cone", "parallel_vec", "cone_vec", "operator", "data",
                 "link", "to_astra", "from_astra"):
        setattr(mod, name, overrides.get(name, _forbidden(f"tomosipo.{name}")))
    return mod


def _stub_astra(use_cuda: bool):
    mod = types.ModuleType("astra")
    mod.__version__ = "2.5.0"
    mod.use_cuda = lambda: use_cuda
    for name in ("create_projector", "data3d", "experimental", "projector3d", "algorithm",
                 "set_gpu_index"):
        setattr(mod, name, _forbidden(f"astra.{name}"))
    return mod


# ---------------------------------------------------------------------------------------------
# error paths (no tomosipo, no CUDA needed)
# ---------------------------------------------------------------------------------------------
def test_missing_tomosipo_raises_runtime_error_naming_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomosipo", None)  # import fails as if not installed
    for g in (PARALLEL, FAN):
        with pytest.raises(RuntimeError) as err:
            RayTransform(g, backend="tomosipo")
        msg = str(err.value)
        assert "tomosipo is not installed" in msg
        assert "backend='torch'" in msg and "backend='odl'" in msg
        assert "github.com/cicwi/tomosipo" in msg and "conda install" in msg
    ok, why = tb.status()
    assert not ok and "not installed" in why


def test_broken_tomosipo_import_under_numpy2_is_explained(monkeypatch):
    class Breaker:
        def find_spec(self, name, path=None, target=None):
            if name == "tomosipo":
                raise ImportError("numpy.core.multiarray failed to import")
            return None

    monkeypatch.delitem(sys.modules, "tomosipo", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Breaker()] + sys.meta_path)
    monkeypatch.setattr(tc, "_numpy_version", lambda: "2.4.0")
    with pytest.raises(RuntimeError) as err:
        RayTransform(PARALLEL, backend="tomosipo")
    msg = str(err.value)
    assert "failed to import" in msg and "NumPy 2.4.0" in msg and "backend='torch'" in msg


def test_cuda_absent_fires_before_any_tomosipo_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomosipo", _stub_tomosipo())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "astra", _stub_astra(use_cuda=True))
        for g in (PARALLEL, FAN):
            with pytest.raises(RuntimeError) as err:
                RayTransform(g, backend="tomosipo")
            msg = str(err.value)
            assert "needs CUDA" in msg and "torch.cuda.is_available() is False" in msg
            assert "backend='torch'" in msg
        ok, why = tb.status()
        assert not ok and "torch.cuda.is_available() is False" in why
    # (the real astra is back: available_backends also probes the odl rows)
    info = {i.name: i for i in available_backends()}["tomosipo"]
    assert not info.available and "CUDA" in info.reason


def test_astra_without_cuda_is_respected_with_stub_astra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomosipo", _stub_tomosipo())
    monkeypatch.setitem(sys.modules, "astra", _stub_astra(use_cuda=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"astra\.use_cuda\(\) is False") as err:
        RayTransform(PARALLEL, backend="tomosipo")
    assert "backend='torch'" in str(err.value)


def test_astra_use_cuda_false_is_respected_with_real_astra(monkeypatch):
    astra = pytest.importorskip("astra")
    monkeypatch.setitem(sys.modules, "tomosipo", _stub_tomosipo())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(astra, "use_cuda", lambda: False)
    with pytest.raises(RuntimeError, match=r"astra\.use_cuda\(\) is False"):
        RayTransform(FAN, backend="tomosipo")
    ok, why = tb.status()
    assert not ok and "astra.use_cuda() is False" in why


def test_old_tomosipo_under_numpy2_is_refused_before_any_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomosipo", _stub_tomosipo(version="0.6.0"))
    monkeypatch.setitem(sys.modules, "astra", _stub_astra(use_cuda=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tc, "_numpy_version", lambda: "2.4.0")
    with pytest.raises(RuntimeError) as err:
        RayTransform(PARALLEL, backend="tomosipo")
    msg = str(err.value)
    assert "tomosipo 0.6.0 does not work with NumPy 2.4.0" in msg
    assert "backend='torch'" in msg and "backend='odl'" in msg
    calls = []

    def volume(**kwargs):
        calls.append(kwargs)
        raise ValueError("Unable to avoid copy while creating an array as requested.")

    # a tomosipo without a parsable version: only the (pure NumPy) geometry probe can tell
    monkeypatch.setitem(sys.modules, "tomosipo", _stub_tomosipo(version="dev", volume=volume))
    with pytest.raises(RuntimeError, match="fails under NumPy 2.4.0"):
        RayTransform(PARALLEL, backend="tomosipo")
    assert calls, "the NumPy probe should have run"
    monkeypatch.setattr(tc, "_numpy_version", lambda: "1.26.4")
    with pytest.raises(RuntimeError, match="building a tomosipo geometry failed"):
        RayTransform(PARALLEL, backend="tomosipo")


_CHILD = r"""
import os, sys, types
import torch

def forbidden(*a, **k):
    print("STUB CALLED", flush=True)
    os._exit(3)

ts = types.ModuleType("tomosipo")
ts.__version__ = "0.7.0"
for name in ("volume", "parallel", "cone", "parallel_vec", "cone_vec", "operator", "data"):
    setattr(ts, name, forbidden)
sys.modules["tomosipo"] = ts
from ctflow.operators.ct import ParallelBeam2D, FanBeam2D, RayTransform, available_backends

def attempt(mode):
    for g in (ParallelBeam2D(16, 8), FanBeam2D(16, 8, source_origin=3.0, origin_detector=1.0)):
        try:
            RayTransform(g, backend="tomosipo")
        except RuntimeError as exc:
            print(mode, "RuntimeError:", exc, flush=True)
        else:
            print("NO ERROR", flush=True)
            sys.exit(4)
    info = {i.name: i for i in available_backends()}["tomosipo"]
    assert not info.available, info
    print(mode, "SURVIVED", flush=True)

if not torch.cuda.is_available():
    attempt("environment")        # this machine as it is: no CUDA
try:
    import astra
except Exception:
    astra = None
if astra is not None:             # CUDA claimed by torch, but ASTRA without CUDA
    torch.cuda.is_available = lambda: True
    astra.use_cuda = lambda: False
    attempt("astra_no_cuda")
print("DONE", flush=True)
"""


def test_cuda_absent_path_does_not_crash_the_interpreter():
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    out = proc.stdout
    assert "DONE" in out and "STUB CALLED" not in out
    if not torch.cuda.is_available():
        assert "environment SURVIVED" in out and "needs CUDA" in out
    try:
        import astra  # noqa: F401
    except Exception:
        pass
    else:
        assert "astra_no_cuda SURVIVED" in out and "astra.use_cuda() is False" in out


def test_available_backends_reports_tomosipo_with_reason():
    infos = {i.name: i for i in available_backends()}
    info = infos["tomosipo"]
    assert (info.backend, info.impl) == ("tomosipo", "astra_cuda")
    assert info.available == _USABLE and info.reason
    if not info.available:
        assert "backend='torch'" in info.reason


def test_bad_options_and_geometry(monkeypatch):
    with pytest.raises(ValueError, match="cpu_inputs"):
        tb.TomosipoRayBackend(PARALLEL, cpu_inputs="copy")
    with pytest.raises(ValueError, match="max_slices"):
        tb.TomosipoRayBackend(PARALLEL, max_slices=0)
    with pytest.raises(ValueError, match="geometry"):
        tb.TomosipoRayBackend("not a geometry")
    with pytest.raises(ValueError, match="one slice"):
        tb.tomosipo_vectors(FAN, slices=2)


# ---------------------------------------------------------------------------------------------
# the geometry conversion, checked without tomosipo
# ---------------------------------------------------------------------------------------------
def _to_ctflow(p):
    """(z, y', x) tomosipo coordinates -> ctflow (x, y)."""
    return p[..., 2], -p[..., 1]


@pytest.mark.parametrize("slices", [1, 3])
def test_volume_voxel_centres_match_ctflow_pixels(slices):
    g = ParallelBeam2D(6, 4, extent=1.5)
    spec = tb.volume_spec(g, slices)
    assert spec["shape"] == (slices, 6, 6)
    size = torch.tensor(spec["size"], dtype=torch.float64)
    shape = torch.tensor(spec["shape"], dtype=torch.float64)
    voxel = size / shape
    assert torch.allclose(voxel, torch.full((3,), g.pixel_size, dtype=torch.float64))
    # tomosipo: voxel (k, r, c) centre = pos - size/2 + (index + 1/2) * voxel, per axis
    lo = torch.tensor(spec["pos"], dtype=torch.float64) - size / 2
    r = torch.arange(6, dtype=torch.float64)
    yprime = lo[1] + (r + 0.5) * voxel[1]
    xs = lo[2] + (r + 0.5) * voxel[2]
    xg, yg = g.pixel_centres()
    assert torch.allclose(xg, xs.view(1, 6).expand(6, 6))
    assert torch.allclose(yg, (-yprime).view(6, 1).expand(6, 6))


def test_parallel_vectors_reproduce_ctflow_rays():
    g = ParallelBeam2D(10, [0.0, 0.3, 1.2, 2.9, -0.7], detectors=13, detector_spacing=0.21)
    slices = 3
    v = {k: torch.as_tensor(a) for k, a in tb.tomosipo_vectors(g, slices).items()
         if k not in ("kind", "shape")}
    assert tb.tomosipo_vectors(g, slices)["shape"] == (slices, 13)
    theta = g.angles
    u = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    s = g.detector_positions()
    j = torch.arange(13, dtype=torch.float64) - 6
    pix = v["det_pos"][:, None, :] + j[None, :, None] * v["det_u"][:, None, :]  # (A, D, 3)
    px, py = _to_ctflow(pix)
    # every detector pixel centre lies on the line x cos + y sin = s_j ...
    assert torch.allclose(px * u[:, None, 0] + py * u[:, None, 1], s.expand(5, 13), atol=1e-12)
    # ... and the rays run along it, in the image plane
    dx, dy = _to_ctflow(v["ray_dir"])
    assert torch.allclose(dx * u[:, 0] + dy * u[:, 1], torch.zeros(5, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(dx ** 2 + dy ** 2, torch.ones(5, dtype=torch.float64))
    assert torch.all(v["ray_dir"][:, 0] == 0) and torch.all(pix[..., 0] == 0)
    # rows step along z by one slice height: row k is slice k's mid-plane
    assert torch.allclose(v["det_v"], torch.tensor([g.pixel_size, 0.0, 0.0],
                                                      dtype=torch.float64).expand(5, 3))
    assert torch.allclose(v["det_u"].norm(dim=1), torch.full((5,), 0.21, dtype=torch.float64))


def test_fan_vectors_reproduce_ctflow_rays():
    g = FanBeam2D(10, 7, source_origin=4.0, origin_detector=2.5, detectors=11)
    v = {k: torch.as_tensor(a) for k, a in tb.tomosipo_vectors(g).items()
         if k not in ("kind", "shape")}
    theta = g.angles
    sx, sy = _to_ctflow(v["src_pos"])
    # S(theta) = R_s (sin, -cos)
    assert torch.allclose(sx, 4.0 * torch.sin(theta))
    assert torch.allclose(sy, -4.0 * torch.cos(theta))
    j = torch.arange(11, dtype=torch.float64) - 5
    pix = v["det_pos"][:, None, :] + j[None, :, None] * v["det_u"][:, None, :]
    px, py = _to_ctflow(pix)
    e = torch.stack([-torch.sin(theta), torch.cos(theta)], 1)
    u = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    s = g.detector_positions()
    ex = 2.5 * e[:, None, 0] + s[None, :] * u[:, None, 0]
    ey = 2.5 * e[:, None, 1] + s[None, :] * u[:, None, 1]
    assert torch.allclose(px, ex, atol=1e-12) and torch.allclose(py, ey, atol=1e-12)
    assert torch.all(v["src_pos"][:, 0] == 0) and torch.all(pix[..., 0] == 0)


def test_real_tomosipo_geometry_objects_without_cuda():
    """Where tomosipo is installed (CUDA not needed: no ASTRA 3D call), its geometry objects
    carry our vectors into ASTRA's ``(x, y, z)`` order with the ``(v, angle, u)`` data shape."""
    try:
        ts = tc._import_tomosipo()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    if tc._numpy_problem(ts) is not None:
        pytest.skip(tc._numpy_problem(ts))
    for g, k in ((ParallelBeam2D(8, 5, detectors=11), 3),
                 (FanBeam2D(8, 4, source_origin=3.0, origin_detector=1.5), 1)):
        vg, pg = tb.tomosipo_geometries(ts, g, k)
        assert tuple(ts.links.geometry_shape(vg)) == (k, 8, 8)
        assert tuple(ts.links.geometry_shape(pg)) == (k, *g.sinogram_shape)
        astra_pg = pg.to_astra()
        vec = tb.tomosipo_vectors(g, k)
        first = vec["ray_dir"] if "ray_dir" in vec else vec["src_pos"]
        expected = torch.cat([torch.as_tensor(a)[:, [2, 1, 0]] for a in
                              (first, vec["det_pos"], vec["det_u"], vec["det_v"])], 1)
        assert torch.allclose(torch.as_tensor(astra_pg["Vectors"]), expected)
        astra_vg = vg.to_astra()
        e = g.extent
        assert (astra_vg["GridColCount"], astra_vg["GridRowCount"],
                astra_vg["GridSliceCount"]) == (8, 8, k)
        opt = astra_vg["option"]
        assert math.isclose(opt["WindowMinX"], -e) and math.isclose(opt["WindowMaxY"], e)


def _emulated_astra_forward(images, g, step_fraction=0.25):
    """ASTRA's ray model on the tomosipo description, emulated in torch: for every detector
    pixel, the ray through its centre (from the source for fan beams) sampled every
    ``step_fraction`` pixel widths with trilinear interpolation (zero outside) of the
    ``(K, N, N)`` volume laid out by :func:`volume_spec`; returns ``(K, angles, detectors)``."""
    k = images.shape[0]
    spec = tb.volume_spec(g, k)
    vec = tb.tomosipo_vectors(g, k)
    half = torch.tensor(spec["size"], dtype=torch.float64) / 2
    rows, cols = vec["shape"]
    a = g.num_angles
    det_pos = torch.as_tensor(vec["det_pos"])
    det_u, det_v = torch.as_tensor(vec["det_u"]), torch.as_tensor(vec["det_v"])
    ju = torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2
    jv = torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2
    pix = (det_pos[None, :, None, :] + jv[:, None, None, None] * det_v[None, :, None, :]
           + ju[None, None, :, None] * det_u[None, :, None, :])        # (rows, A, cols, 3)
    h = g.pixel_size
    reach = math.sqrt(2.0) * g.extent + h
    if vec["kind"] == "parallel_vec":
        d = torch.as_tensor(vec["ray_dir"])[None, :, None, :].expand_as(pix)
        start = pix - reach * d
        length = torch.full(pix.shape[:-1], 2 * reach, dtype=torch.float64)
    else:  # the whole line through the image: within `reach` of the origin
        src = torch.as_tensor(vec["src_pos"])[None, :, None, :].expand_as(pix)
        d = pix - src
        d = d / d.norm(dim=-1, keepdim=True)
        start = src + (g.source_origin - reach) * d
        length = torch.full(pix.shape[:-1], 2 * reach, dtype=torch.float64)
    n_steps = int(math.ceil(float(length.max()) / (step_fraction * h)))
    t = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps       # midpoint rule
    pts = start[..., None, :] + (t[:, None] * length[..., None, None])[..., :] * d[..., None, :]
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=False (volume edges at +-1)
    grid = torch.stack([pts[..., 2] / half[2], pts[..., 1] / half[1], pts[..., 0] / half[0]], -1)
    vol = images[None, None].to(torch.float64)                            # (1, 1, K, N, N)
    samples = F.grid_sample(vol, grid.reshape(1, rows, a * cols, n_steps, 3), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    sino = samples.reshape(rows, a, cols, n_steps).sum(-1) * (length / n_steps)
    return sino


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _asymmetric_phantom(g):
    xg, yg = g.pixel_centres()
    img = ((xg - 0.4) ** 2 + (yg - 0.25) ** 2 <= 0.2 ** 2).double()
    img += 0.5 * (((xg + 0.3).abs() <= 0.15) & ((yg + 0.5).abs() <= 0.1)).double()
    return img


@pytest.mark.parametrize("g", [PARALLEL, FAN], ids=["parallel", "fan"])
def test_emulated_astra_model_on_tomosipo_geometry_matches_torch_backend(g):
    torch_op = RayTransform(g)
    sl = shepp_logan(g)[0, 0]
    asym = _asymmetric_phantom(g)
    for img in (sl, asym):
        ref = torch_op(img[None, None])[0, 0]
        emu = _emulated_astra_forward(img[None], g)[0]
        assert emu.shape == ref.shape
        assert _rel(emu, ref) < 0.01, _rel(emu, ref)
    # a wrong orientation (image flipped top-bottom) is far off: the check has teeth
    ref = torch_op(asym[None, None])[0, 0]
    assert _rel(_emulated_astra_forward(asym.flip(0)[None], g)[0], ref) > 0.3


def test_emulated_stacked_slices_project_independently():
    g = ParallelBeam2D(32, 20)
    imgs = torch.stack([shepp_logan(g)[0, 0], _asymmetric_phantom(g),
                        _asymmetric_phantom(g).flip(1)])
    stacked = _emulated_astra_forward(imgs, g)
    for k in range(3):
        single = _emulated_astra_forward(imgs[k:k + 1], g)[0]
        assert torch.allclose(stacked[k], single, rtol=1e-9, atol=1e-9)


class _EmulatedOperator:
    """Stands in for ``ts.operator`` on the CPU: the emulated ASTRA forward model on the
    geometry objects it was built from, and its exact transpose (by autograd) as ``.T``."""

    def __init__(self, g, vg, pg, log):
        self.g, self.vg, self.pg, self.log = g, vg, pg, log
        self.T = self._bp

    def __call__(self, x, out):
        assert tuple(x.shape) == self.vg["shape"] and x.is_contiguous()
        self.log.append(("fp", x.shape[0]))
        out.copy_(_emulated_astra_forward(x.double(), self.g).float())

    def _bp(self, y, out):
        k = y.shape[0]
        assert tuple(y.shape) == (k, self.g.num_angles, self.g.detectors) == \
            (self.pg["shape"][0], self.g.num_angles, self.pg["shape"][1])
        self.log.append(("bp", k))
        x = torch.zeros(self.vg["shape"], dtype=torch.float64, requires_grad=True)
        (_emulated_astra_forward(x, self.g) * y.double()).sum().backward()
        out.copy_(x.grad.float())


def _cpu_backend(g, stack=True, max_slices=64):
    """A TomosipoRayBackend whose tomosipo module is a CPU emulation (checks bypassed), to
    exercise the batching code without CUDA."""
    log = []
    fake = types.SimpleNamespace(
        volume=lambda **kw: dict(kw),
        parallel_vec=lambda **kw: dict(kw, kind="parallel_vec"),
        cone_vec=lambda **kw: dict(kw, kind="cone_vec"),
        operator=lambda vg, pg: _EmulatedOperator(g, vg, pg, log))
    be = object.__new__(tb.TomosipoRayBackend)
    be.geometry, be._ts, be.cpu_inputs = g, fake, "move"
    be.stack = stack and isinstance(g, ParallelBeam2D)
    be.max_slices, be._ops = max_slices, OrderedDict()
    return be, log


def _project(be, t, forward):
    g = be.geometry
    shape = g.sinogram_shape if forward else g.image_shape
    out = torch.full((t.shape[0], *shape), float("nan"))
    be._project(t.float().contiguous(), out, forward)
    return out


@pytest.mark.parametrize("g", [ParallelBeam2D(16, 12), FanBeam2D(16, 12, source_origin=3.0,
                                                                   origin_detector=1.5)],
                         ids=["parallel", "fan"])
def test_batching_code_with_emulated_tomosipo(g):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(5, *g.image_shape, generator=gen)
    y = torch.rand(5, *g.sinogram_shape, generator=gen)
    chunked, log = _cpu_backend(g, max_slices=2)
    single, _ = _cpu_backend(g, stack=False)
    fwd = _project(chunked, x, True)
    assert not torch.isnan(fwd).any()
    assert torch.allclose(fwd, _project(single, x, True), rtol=1e-5, atol=1e-5)
    for k in range(5):  # every image lands in its own rows
        assert torch.allclose(fwd[k], _emulated_astra_forward(x[k:k + 1].double(), g)[0].float(),
                              rtol=1e-5, atol=1e-5)
    back = _project(chunked, y, False)
    assert torch.allclose(back, _project(single, y, False), rtol=1e-5, atol=1e-5)
    # the emulated back-projection is the transpose: dot test through the chunked code
    lhs = float((fwd.double() * y.double()).sum())
    rhs = float((x.double() * back.double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    sizes = sorted({k for _, k in log})
    assert sizes == ([1, 2] if isinstance(g, ParallelBeam2D) else [1])
    assert len(chunked._ops) == len(sizes)  # one cached operator per slice count


# ---------------------------------------------------------------------------------------------
# the real backend (tomosipo + CUDA)
# ---------------------------------------------------------------------------------------------
@needs_tomosipo
@pytest.mark.parametrize("g", [PARALLEL, FAN], ids=["parallel", "fan"])
def test_real_shapes_dtypes_and_devices(g):
    op = RayTransform(g, backend="tomosipo")
    assert not op.exact_adjoint
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(2, 3, *g.image_shape, dtype=dtype,
                       generator=torch.Generator().manual_seed(0)).cuda()
        y = op(x)
        assert y.shape == (2, 3, *g.sinogram_shape) and y.dtype == dtype and y.is_cuda
        back = op.adjoint(y)
        assert back.shape == x.shape and back.dtype == dtype and back.is_cuda
        assert torch.allclose(op(x[1:2, 2:3]), y[1:2, 2:3], rtol=1e-4, atol=1e-5)
    xc = torch.rand(1, 1, *g.image_shape)
    yc = op(xc)
    assert yc.device.type == "cpu"
    assert torch.allclose(yc, op(xc.cuda()).cpu(), rtol=1e-5, atol=1e-6)
    strict = RayTransform(g, backend="tomosipo", cpu_inputs="error")
    with pytest.raises(ValueError, match="CUDA tensors"):
        strict(xc)


@needs_tomosipo
@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_real_agrees_with_torch_backend_on_shepp_logan(kind):
    g = ParallelBeam2D(128, 90) if kind == "parallel" else FanBeam2D(
        128, 120, source_origin=3.0, origin_detector=1.5)
    x = shepp_logan(g).float().cuda()
    ref = RayTransform(g)(x)
    got = RayTransform(g, backend="tomosipo")(x)
    assert _rel(got, ref) < 0.02
    # FBP reconstructions (Hann, cut-off 0.8; ASTRA samples bin centres: no aperture correction)
    rec_ref = FBP(g, "hann", frequency_scaling=0.8)(ref)
    rec = FBP(g, "hann", frequency_scaling=0.8, aperture_correction=False)(got)
    assert _rel(rec, rec_ref) < 0.02
    asym = _asymmetric_phantom(g)[None, None].float().cuda()
    assert _rel(RayTransform(g, backend="tomosipo")(asym), RayTransform(g)(asym)) < 0.03
    # back-projections agree too (both approximate the same continuous back-projection)
    assert _rel(RayTransform(g, backend="tomosipo").adjoint(ref), RayTransform(g).adjoint(ref)) \
        < 0.03


@needs_tomosipo
def test_real_stacking_equals_looping_and_chunks():
    g = ParallelBeam2D(48, 30)
    x = torch.rand(5, 2, 48, 48, generator=torch.Generator().manual_seed(2)).cuda()
    stacked = RayTransform(g, backend="tomosipo", max_slices=4)
    looped = RayTransform(g, backend="tomosipo", stack=False)
    assert torch.allclose(stacked(x), looped(x), rtol=1e-5, atol=1e-5)
    y = stacked(x)
    assert torch.allclose(stacked.adjoint(y), looped.adjoint(y), rtol=1e-5, atol=1e-5)


@needs_tomosipo
def test_real_matches_odl_astra_cuda_when_available():
    info = _INFOS["odl/astra_cuda"]
    if not info.available:
        pytest.skip(f"odl/astra_cuda: {info.reason}")
    for g in (PARALLEL, FAN):
        x = shepp_logan(g).float().cuda()
        a = RayTransform(g, backend="tomosipo")(x)
        b = RayTransform(g, backend="odl", impl="astra_cuda")(x)
        assert _rel(a, b) < 1e-2


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py without a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: gpu_check would benchmark")
def test_gpu_check_without_cuda_reports_and_exits_zero(tmp_path, capsys):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import gpu_check

    report = gpu_check.run(quick=True, out=tmp_path, device="cuda")
    assert report["status"] == "skipped" and "CUDA" in report["reason"]
    names = {b["name"]: b for b in report["backends"]}
    for name in ("torch-cuda", "odl/astra_cuda", "tomosipo"):
        assert not names[name]["available"] and names[name]["reason"]
    assert list(tmp_path.iterdir()) == []  # nothing written without a GPU
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tomosipo" in out and "unavailable" in out


def test_gpu_check_contract_and_timing_code_on_cpu():
    """The contract/timing functions of gpu_check, run on the CPU with tiny geometries (the
    torch backend against itself, and odl/astra_cpu where usable): every check passes."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import gpu_check

    tiny = {"parallel": lambda: ParallelBeam2D(16, 12),
            "fan": lambda: FanBeam2D(16, 16, source_origin=3.0, origin_detector=1.5)}
    agree = {"parallel": lambda: ParallelBeam2D(48, 40)}
    rows = gpu_check.contract("torch-cpu", "torch", {}, "cpu", geometries=tiny, agreement=agree)
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    checks = {r["check"] for r in rows}
    assert {"shapes/dtype/device", "dot test float64 (signed noise)", "autograd = adjoint",
            "sinogram vs torch (Shepp-Logan)", "Hann FBP vs torch (Shepp-Logan)"} <= checks
    if _INFOS["odl/astra_cpu"].available:
        rows = gpu_check.contract("odl/astra_cpu", "odl", {"impl": "astra_cpu"}, "cpu",
                                  geometries=tiny, agreement=agree)
        assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    # a backend that cannot be built fails its contract instead of stopping the check
    rows = gpu_check.contract("tomosipo", "tomosipo", {}, "cpu", geometries=tiny, agreement={})
    assert rows and not any(r["passed"] for r in rows)
    t = gpu_check.timings("torch-cpu", "torch", {}, "cpu", True, 1, cases=[(16, 8)],
                          batches=(1, 2))
    assert [(r["image_size"], r["batch"]) for r in t] == [(16, 1), (16, 2)]
    assert all(r["forward_s"] > 0 and r["adjoint_s"] > 0 for r in t)
    report = {"backends": [{"name": "torch-cpu", "available": True, "reason": ""}],
              "contract": rows, "timings": t,
              "meta": {"gpu": "none", "device": "cpu", "date": "today", "versions": {"x": "1"},
                       "repeats": 1}}
    md = gpu_check._md(report)
    assert "| torch-cpu | 16² | 8 |" in md and f"0/{len(rows)} checks passed" in md

