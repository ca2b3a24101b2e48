"""ctflow.solvers.reconstruct: dispatch, validation before any work, layouts, seeding; and
acceptance (c): every flow solver reduces the data residual on a small CT problem."""
import pytest
import torch

from ctflow.flow import GaussianVelocity
from ctflow.priors import FlowPrior
from ctflow.solvers import METHODS, DFlow, MSFlow, reconstruct

from helpers import Dense, Mask

DT = torch.float64


class Exploding:
    """A velocity field that must never be called (validation happens before any work)."""

    def __call__(self, x, t):
        raise AssertionError("the velocity field was evaluated before validation")


def gauss_prior(n, *, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    mu = 0.6 * (torch.rand(1, n, n, generator=g, dtype=dtype) - 0.5)
    sig = 0.5 + 0.3 * torch.rand(1, n, n, generator=g, dtype=dtype)
    return FlowPrior(GaussianVelocity(mu, sig), image_size=n, scale=4.0, shift=-2.0)


def ct_problem(n=16, sigma=0.01):
    """A tiny parallel-beam CT problem (RayTransform when available, else a random matrix)."""
    g = torch.Generator().manual_seed(0)
    try:
        from ctflow.operators import ParallelBeam2D, RayTransform
        A = RayTransform(ParallelBeam2D(image_size=n, angles=10))
    except (ImportError, AttributeError, TypeError):
        A = Dense(torch.randn(10 * 23, n * n, generator=g, dtype=DT) / n, n)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n, dtype=DT), torch.linspace(-1, 1, n,
                                                                             dtype=DT),
                            indexing="ij")
    x = ((xx ** 2 + yy ** 2 < 0.6).to(DT) * 0.6 + 0.2 * ((xx - 0.2) ** 2 + yy ** 2 < 0.1)
         ).reshape(1, 1, n, n)
    clean = A(x)
    y = clean + sigma * float(clean.abs().mean()) * torch.randn(clean.shape, generator=g,
                                                                dtype=DT)
    return A, y, x


# --------------------------------------------------------------------------------------------
# acceptance (c)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, options", [
    ("msflow", dict(K=4, M=2, sweeps=8)),
    ("msflow", dict(K=4, M=2, sweeps=8, sweep="jacobi")),
    ("msflow", dict(K=4, M=2, sweeps=4, update="exact", inner_iters=2)),
    ("msflow", dict(K=4, M=2, sweeps=8, schedule="continuation")),
    ("msflow", dict(K=4, M=2, sweeps=8, schedule="adaptive")),
    ("msflow", dict(K=4, M=2, sweeps=8, update="joint")),
    ("dflow", dict(N=8, iterations=3, max_iter=5)),
])
def test_flow_solvers_reduce_the_data_residual_on_ct(method, options):
    A, y, x = ct_problem()
    prior = gauss_prior(16)
    sigma = 0.01 * float(y.abs().mean())
    res = reconstruct(y, A, prior, method=method, sigma=sigma, **options)
    r = [h["residual"] for h in res.history]
    assert r[-1] < 0.8 * r[0], r
    assert res.image.shape == x.shape and res.nfe["forward"] > 0
    assert 0 <= float(res.image.min()) and float(res.image.max()) <= 1


# --------------------------------------------------------------------------------------------
# dispatcher behaviour
# --------------------------------------------------------------------------------------------
def test_reconstruct_matches_the_solver_class_and_is_seeded():
    A = Mask((torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.3).to(DT))
    prior = gauss_prior(8)
    y = A(torch.rand(1, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(1)))
    opts = dict(K=2, M=2, sweeps=3, alpha=0.5)
    a = reconstruct(y, A, prior, method="msflow", sigma=0.05, seed=4, **opts)
    b = MSFlow(seed=4, **opts).solve(A, y, prior, 0.05)
    assert torch.equal(a.image, b.image) and a.method == "msflow"
    c = reconstruct(y, A, prior, method="msflow", sigma=0.05, seed=5, **opts)
    assert not torch.equal(a.image, c.image)
    d = reconstruct(y, A, prior, method="dflow", sigma=0.05, N=4, iterations=1)
    assert torch.equal(d.image, DFlow(N=4, iterations=1).solve(A, y, prior, 0.05).image)


def test_layouts_come_back_as_given():
    A = Mask(torch.ones(1, 8, 8, dtype=DT))
    prior = gauss_prior(8)
    y = torch.full((1, 1, 8, 8), 0.4, dtype=DT)
    opts = dict(method="msflow", sigma=0.05, K=2, M=1, sweeps=2)
    batched = reconstruct(y, A, prior, **opts).image
    assert batched.shape == (1, 1, 8, 8)
    assert reconstruct(y[0], A, prior, **opts).image.shape == (1, 8, 8)
    bare = reconstruct(y[0, 0], A, prior, **opts).image
    assert bare.shape == (8, 8) and torch.equal(bare, batched[0, 0])
    two = reconstruct(y.repeat(2, 1, 1, 1), A, prior, **opts).image
    assert two.shape == (2, 1, 8, 8)


def test_progress_bar_only_when_asked(capsys):
    A = Mask(torch.ones(1, 8, 8, dtype=DT))
    y = torch.full((1, 1, 8, 8), 0.4, dtype=DT)
    reconstruct(y, A, gauss_prior(8), sigma=0.05, K=2, M=1, sweeps=2)
    assert "MS-Flow" not in capsys.readouterr().err
    reconstruct(y, A, gauss_prior(8), sigma=0.05, K=2, M=1, sweeps=2, progress=True)
    assert "MS-Flow" in capsys.readouterr().err


def test_validation_happens_before_any_work():
    A = Mask(torch.ones(1, 8, 8, dtype=DT))
    prior = FlowPrior(Exploding(), image_size=8, scale=2.0, shift=-1.0)
    y = torch.zeros(1, 1, 8, 8, dtype=DT)
    with pytest.raises(ValueError, match="unknown method 'sart'; choose one of 'msflow'"):
        reconstruct(y, A, prior, method="sart")
    with pytest.raises(ValueError, match="unknown option.*'step_size'"):
        reconstruct(y, A, prior, method="msflow", step_size=0.1, sigma=0.05)
    with pytest.raises(ValueError, match="option update must be one of"):
        reconstruct(y, A, prior, method="msflow", update="newton", sigma=0.05)
    with pytest.raises(ValueError, match="unknown option.*'sweeps'"):
        reconstruct(y, A, prior, method="dflow", iterations=2, sweeps=3, sigma=0.05)
    bad = y.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        reconstruct(bad, A, prior, sigma=0.05)
    bad[0, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        reconstruct(bad, A, prior, method="dflow", sigma=0.05)
    with pytest.raises(ValueError, match="shape mismatch"):
        reconstruct(torch.zeros(1, 1, 8, 9, dtype=DT), A, prior, sigma=0.05)
    with pytest.raises(ValueError, match="shape mismatch"):
        reconstruct(torch.zeros(1, 1, 1, 8, 8, dtype=DT), A, prior, sigma=0.05)
    with pytest.raises(ValueError, match="channel"):
        reconstruct(torch.zeros(1, 3, 8, 8, dtype=DT), A, prior, sigma=0.05)
    with pytest.raises(ValueError, match="sigma"):
        reconstruct(y, A, prior, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        reconstruct(y, A, prior, sigma=float("nan"))
    with pytest.raises(ValueError, match="needs a prior"):
        reconstruct(y, A, None, method="msflow", sigma=0.05)
    small = FlowPrior(Exploding(), image_size=4)
    with pytest.raises(ValueError, match="4x4 images but the operator's domain shape is"):
        reconstruct(y, A, small, method="dflow", sigma=0.05)
    with pytest.raises(ValueError, match="y must be a torch.Tensor"):
        reconstruct(y.numpy(), A, prior, sigma=0.05)


def test_method_table_and_classical_dispatch():
    assert set(METHODS) == {"msflow", "dflow", "pnpflow", "otode", "flowdp", "fbp", "tv",
                            "cgls", "landweber"}
    pytest.importorskip("ctflow.solvers.cgls")
    A, y, x = ct_problem()
    res = reconstruct(y, A, None, method="cgls", sigma=0.01)
    assert res.image.shape == x.shape
    assert float((A(res.image) - y).norm()) < float(y.norm())


def test_integrator_alias_and_init_checks():
    A = Mask(torch.ones(1, 8, 8, dtype=DT))
    y = torch.full((1, 1, 8, 8), 0.4, dtype=DT)
    prior = gauss_prior(8)
    res = reconstruct(y, A, prior, method="msflow", sigma=0.05, K=2, M=1, sweeps=1,
                      integrator="heun")
    assert res.options["method"] == "heun" and res.nfe["forward"] == 2 * (2 + 2 + 2)
    res = reconstruct(y, A, prior, method="dflow", sigma=0.05, N=2, iterations=1,
                      integrator="midpoint")
    assert res.options["method"] == "midpoint"
    with pytest.raises(ValueError, match="disagree"):
        MSFlow(method="euler", integrator="heun")
    with pytest.raises(ValueError, match="init image shape mismatch"):
        reconstruct(y, A, prior, sigma=0.05, K=2, M=1, sweeps=1,
                    init=torch.zeros(1, 1, 4, 4, dtype=DT))
    called = []

    def fbp_like(meas):
        called.append(meas.shape)
        return torch.full((1, 1, 8, 8), 0.4, dtype=DT)

    res = reconstruct(y, A, prior, sigma=0.05, K=2, M=1, sweeps=1, init=fbp_like)
    assert called == [(1, 1, 8, 8)] and res.options["init"] == "fbp_like"
    with pytest.raises(ValueError, match="init='fbp' needs a CT operator"):
        reconstruct(y, A, prior, sigma=0.05, K=2, M=1, sweeps=1, init="fbp")


def test_interpolated_initial_trajectory_starts_with_gaps():
    A, y, _ = ct_problem()
    prior = gauss_prior(16)
    sigma = 0.01 * float(y.abs().mean())
    res = reconstruct(y, A, prior, sigma=sigma, K=4, M=2, sweeps=6,
                      trajectory="interpolate")
    traj = [h["trajectory_loss"] for h in res.history]
    assert traj[0] > 0 and traj[-1] < traj[0]
    # rollout (default) starts on an exact ODE trajectory
    res = reconstruct(y, A, prior, sigma=sigma, K=4, M=2, sweeps=1)
    assert res.history[0]["trajectory_loss"] == 0.0


def test_prior_given_by_name():
    from ctflow.priors import list_priors
    A = Mask(torch.ones(1, 8, 8, dtype=DT))
    y = torch.full((1, 1, 8, 8), 0.4, dtype=DT)
    with pytest.raises(ValueError, match="no-such-prior"):
        reconstruct(y, A, "no-such-prior", sigma=0.05)
    if "ct64" not in list_priors():
        pytest.skip("the bundled ct64 prior is not installed")
    A64 = Mask((torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float())
    y64 = A64(torch.full((1, 1, 64, 64), 0.3))
    res = reconstruct(y64, A64, "ct64", sigma=0.01, K=1, M=1, sweeps=1, alpha=0.0)
    assert res.image.shape == (1, 1, 64, 64) and res.nfe["forward"] == 2
    with pytest.raises(ValueError, match="64x64 images"):
        reconstruct(y, A, "ct64", sigma=0.05)


@pytest.mark.parametrize("method", ["msflow", "dflow", "pnpflow", "otode"])
def test_tv_initial_image_is_the_tv_reconstruction(method):
    """init="tv" starts from exactly TV(weight=tv_weight) of the same data: on a random mask it
    fills the holes, where the adjoint leaves zeros."""
    from ctflow.solvers import initial_image
    n, sigma, w = 12, 0.05, 0.4
    g = torch.Generator().manual_seed(3)
    A = Mask((torch.rand(1, n, n, generator=g) > 0.6).to(DT))
    x = 0.3 + 0.4 * (torch.arange(n, dtype=DT)[None, :] > n / 2).to(DT).expand(n, n)
    y = A(x.reshape(1, 1, n, n)) + sigma * torch.randn(1, 1, n, n, generator=g, dtype=DT)
    tv = reconstruct(y, A, None, method="tv", sigma=sigma, weight=w).image
    start, label = initial_image("tv", A, y, owner="t", sigma=sigma, tv_weight=w)
    assert label == "tv" and torch.allclose(start, tv.clamp(0, 1), atol=1e-12)
    holes = A.mask.reshape(n, n) == 0
    assert float((start.reshape(n, n) - x)[holes].abs().mean()) < 0.1   # adjoint: 0.3 to 0.7
    with pytest.raises(ValueError, match="noise level"):
        initial_image("tv", A, y, owner="t")
    opts = {"msflow": dict(K=2, M=1, sweeps=1, alpha=1.0), "dflow": dict(N=2, iterations=0),
            "pnpflow": dict(steps=2, t_start=0.5), "otode": dict(steps=2)}[method]
    res = reconstruct(y, A, gauss_prior(n), method=method, sigma=sigma, init="tv",
                      tv_weight=w, **opts)
    assert torch.isfinite(res.image).all()
    with pytest.raises(ValueError, match="tv_weight"):
        reconstruct(y, A, gauss_prior(n), method=method, sigma=sigma, tv_weight=-1.0)
