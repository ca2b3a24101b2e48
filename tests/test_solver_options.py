"""The options convention of the solvers: one frozen ``Options`` dataclass per solver class,
built from keywords or given whole, checked in ``__post_init__``; options that have no effect
in the given combination are refused; TV at sigma = 0; one CG with two stopping rules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ctflow.priors import gaussian_prior
from ctflow.solvers import (CGLS, DFlow, FBPSolver, Landweber, METHODS, MSFlow, OTODE,
                            PnPFlow, TV, conjugate_gradient, method, reconstruct)

from helpers import Dense, Mask

DT = torch.float64
SOLVERS = [MSFlow, DFlow, PnPFlow, OTODE, FBPSolver, TV, CGLS, Landweber]


def _mask_problem(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = Mask((torch.rand(1, n, n, generator=g) > 0.4).to(DT))
    x = torch.rand(1, 1, n, n, generator=g, dtype=DT)
    return A, A(x) + 0.01 * torch.randn(1, 1, n, n, generator=g, dtype=DT), x


def _prior(n=8):
    return gaussian_prior(torch.full((1, n, n), 0.5, dtype=DT), torch.full((1, n, n), 0.2,
                                                                           dtype=DT))


# --------------------------------------------------------------------------- the convention
@pytest.mark.parametrize("cls", SOLVERS)
def test_every_solver_has_a_frozen_options_dataclass(cls):
    opts = cls.Options()
    assert dataclasses.is_dataclass(opts) and isinstance(cls().options, cls.Options)
    name = cls.Options.names()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, name, getattr(opts, name))
    # keywords and an Options instance build the same options; keywords override it
    assert cls(opts).options.as_dict().keys() == cls().options.as_dict().keys()
    assert cls(cls.Options(seed=3)).options.seed == 3
    assert cls(cls.Options(seed=3), seed=4).options.seed == 4
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'nope'; allowed options are"):
        cls(nope=1)
    with pytest.raises(TypeError, match="Options"):
        cls(1)


def test_registry_gives_each_solvers_options_type():
    for name, m in METHODS.items():
        assert m.options_type is m.solver_class().Options, name
    assert method("MSFlow").options_type is MSFlow.Options


def test_defaults_are_the_documented_values():
    o = MSFlow.Options()
    assert (o.K, o.M, o.rho, o.alpha, o.sweeps, o.lam, o.method) == (8, 4, 1000.0, 1.0, 20,
                                                                    1.0, "euler")
    assert (o.update, o.sweep, o.order, o.cg_iters, o.cg_tol) == ("jacobian-free",
                                                                  "gauss-seidel", "forward",
                                                                  10, 1e-6)
    assert (o.decoder_steps, o.decoder_tol, o.max_batch) == (10, 1e-6, "auto")
    assert o.resolved_relaxation() == 1.0
    assert MSFlow.Options(sweep="jacobi").resolved_relaxation() == 0.5
    d = DFlow.Options()
    assert (d.N, d.iterations, d.max_iter, d.history_size) == (32, 10, 5, 20)
    assert (PnPFlow.Options().init, OTODE.Options().init) == ("zeros", "auto")
    assert (TV.Options().weight, TV.Options().weight_mode) == (1.0, "relative")


def test_replace_checks_again_and_values_are_canonical():
    import numpy as np
    o = MSFlow.Options(K=np.int64(3), rho=torch.tensor([1.0, 2.0, 3.0]))
    assert type(o.K) is int and o.rho == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="option K must be an integer"):
        o.replace(K=0)
    with pytest.raises(ValueError, match="unknown option"):
        o.replace(k=2)


def test_integrator_alias_folds_into_method():
    assert MSFlow(integrator="heun").options.method == "heun"
    assert MSFlow(integrator="heun").options.integrator is None
    assert DFlow(method="midpoint", integrator="midpoint").options.method == "midpoint"
    with pytest.raises(ValueError, match="disagree"):
        DFlow(method="euler", integrator="heun")


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cls, kw, match", [
    # MS-Flow
    (MSFlow, dict(draws=2), "option draws=2 has no effect with alpha=1"),
    (MSFlow, dict(order="backward", sweep="jacobi"), "option order='backward' has no effect "
                                                     "with sweep='jacobi'"),
    (MSFlow, dict(order="backward", update="joint"), "option order='backward' has no effect "
                                                     "with update='joint'"),
    (MSFlow, dict(sweep="jacobi", update="joint"), "option sweep='jacobi' has no effect"),
    (MSFlow, dict(relaxation=0.5, update="joint"), "option relaxation=0.5 has no effect"),
    (MSFlow, dict(inner_iters=5), "option inner_iters=5 has no effect unless update='exact'"),
    (MSFlow, dict(max_backtracks=3), "option max_backtracks=3 has no effect"),
    (MSFlow, dict(update="joint", joint_optimizer="adam", max_backtracks=3),
     "option max_backtracks=3 has no effect"),
    (MSFlow, dict(joint_optimizer="adam"), "option joint_optimizer='adam' has no effect"),
    (MSFlow, dict(update="joint", lr=0.1), "option lr=0.1 has no effect"),
    (MSFlow, dict(rho_growth=2.0), "option rho_growth=2.0 has no effect with "
                                   "schedule='constant'"),
    (MSFlow, dict(rho_max=10.0), "option rho_max=10.0 has no effect"),
    (MSFlow, dict(schedule="continuation", rho_min=1.0), "option rho_min=1.0 has no effect "
                                                         "unless schedule='adaptive'"),
    (MSFlow, dict(schedule="continuation", adapt_factor=3.0), "option adapt_factor=3.0"),
    (MSFlow, dict(node_power=3.0), "option node_power=3.0 has no effect unless nodes='power'"),
    (MSFlow, dict(cgls_iters=4), "option cgls_iters=4 has no effect unless init='cgls'"),
    (MSFlow, dict(tv_weight=0.3), "option tv_weight=0.3 has no effect unless init='tv'"),
    (MSFlow, dict(alpha=0.0, init="adjoint"), "option init='adjoint' has no effect with "
                                              "alpha=0 and trajectory='rollout'"),
    (MSFlow, dict(alpha=0.0, init=torch.zeros(1, 1, 8, 8)), "option init='tensor"),
    # D-Flow
    (DFlow, dict(alpha=0.0, init="cgls"), "option init='cgls' has no effect with alpha=0"),
    (DFlow, dict(init="adjoint", cgls_iters=3), "option cgls_iters=3 has no effect"),
    (DFlow, dict(iterations=0, max_iter=9), "option max_iter=9 has no effect with "
                                            "iterations=0"),
    # PnP-Flow
    (PnPFlow, dict(init="adjoint"), "option init='adjoint' has no effect with t_start=0"),
    (PnPFlow, dict(x_init=torch.zeros(1, 1, 8, 8, dtype=DT)), "option x_init='tensor"),
    (PnPFlow, dict(init_iterations=3), "option init_iterations=3 has no effect"),
    (PnPFlow, dict(t_start=0.5, init="cgls", tv_weight=0.2), "option tv_weight=0.2 has no "
                                                             "effect unless init='tv'"),
    (PnPFlow, dict(t_start=0.5, init="adjoint", x_init=torch.zeros(1, 1, 8, 8, dtype=DT)),
     "option init='adjoint' has no effect when x_init is given"),
    # OT-ODE
    (OTODE, dict(init="fbp", x_init=torch.zeros(1, 1, 8, 8, dtype=DT)),
     "option init='fbp' has no effect when x_init is given"),
    (OTODE, dict(init_iterations=4), "option init_iterations=4 has no effect unless "
                                     "init='cgls'"),
    # TV
    (TV, dict(box=True, nonneg=False), "option nonneg=False has no effect with box=True"),
    (TV, dict(weight=0.0, weight_mode="absolute"), "option weight_mode='absolute' has no "
                                                   "effect with weight=0"),
])
def test_options_without_effect_are_refused(cls, kw, match):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {match}"):
        cls(**kw)


def test_the_same_options_pass_where_they_act():
    MSFlow(draws=2, alpha=0.5)
    MSFlow(order="backward")
    MSFlow(update="exact", inner_iters=5, max_backtracks=3)
    MSFlow(update="joint", joint_optimizer="adam", lr=0.1)
    MSFlow(update="joint", max_backtracks=3)
    MSFlow(schedule="continuation", rho_growth=2.0, rho_max=10.0)
    MSFlow(schedule="adaptive", rho_min=1.0, adapt_factor=3.0)
    MSFlow(nodes="power", node_power=3.0)
    MSFlow(init="cgls", cgls_iters=4)
    MSFlow(alpha=0.0, trajectory="interpolate", init="adjoint")
    DFlow(alpha=0.5, init="tv", tv_weight=0.3)
    PnPFlow(t_start=0.5, init="cgls", init_iterations=3)
    OTODE(init="tv", tv_weight=0.2)
    TV(box=True)


def test_data_step_options_follow_the_kind_of_prior():
    """cg_iters / cg_tol are the CG of an image prior's data step; a latent prior's data step
    takes decoder_steps gradient steps through the decoder (decoder_tol): each pair is
    refused for the other kind, before any work."""
    A, y, _ = _mask_problem()

    class Latent:
        is_latent = True
        image_size, channels, scale = 8, 1, 1.0
        velocity = staticmethod(lambda x, t: torch.zeros_like(x))

        def to_model(self, x):
            raise AssertionError("no work may be done")

        from_model = to_model

    with pytest.raises(ValueError, match="option cg_iters=5 has no effect for a latent prior"):
        MSFlow(cg_iters=5).solve(A, y, Latent(), 0.01)
    with pytest.raises(ValueError, match="option decoder_steps=5 has no effect for an "
                                         "image-space prior"):
        MSFlow(decoder_steps=5, K=2, M=1, sweeps=1).solve(A, y, _prior(), 0.01)


def test_unused_start_is_not_computed():
    """With alpha = 0 and the rollout trajectory MS-Flow never builds the initial image (it
    would be unused); D-Flow likewise with alpha = 0. The recorded init is "none"."""
    A, y, _ = _mask_problem()
    res = MSFlow(K=2, M=1, sweeps=1, alpha=0.0).solve(A, y, _prior(), 0.01)
    assert res.options["init"] == "none"
    res = DFlow(N=2, iterations=1, alpha=0.0).solve(A, y, _prior(), 0.01)
    assert res.options["init"] == "none"


# --------------------------------------------------------------------------- sigma = 0
@pytest.mark.parametrize("name, options", [
    ("cgls", dict(iterations=5)), ("landweber", dict(iterations=5)),
    ("tv", dict(iterations=20, weight_mode="unscaled", weight=0.01)),
])
def test_classical_methods_run_with_sigma_zero_or_none(name, options):
    A, y, _ = _mask_problem()
    a = reconstruct(y, A, None, method=name, sigma=0, **options)
    b = reconstruct(y, A, None, method=name, **options)
    assert torch.equal(a.image, b.image) and a.image.shape == y.shape


def test_tv_at_sigma_zero_warns_and_the_unscaled_weight_regularises():
    """The relative and absolute TV weights scale with sigma (lambda = w sigma, w sigma^2):
    at sigma = 0 the TV term vanishes, so TV warns and gives the weight-0 image; the
    unscaled weight is lambda itself and gives the same image as the relative one at the
    sigma with w sigma = lambda."""
    A, y, _ = _mask_problem()
    plain = TV(weight=0.0, iterations=20).solve(A, y, None, 0.0)
    for mode in ("relative", "absolute"):
        with pytest.warns(UserWarning, match=f"weight_mode='{mode}' scales the TV weight "
                                             f"with sigma"):
            r = TV(weight_mode=mode, iterations=20).solve(A, y, None, 0.0)
        assert r.options["effective_weight"] == 0.0
        assert torch.equal(r.image, plain.image)
    lam, sigma = 0.02, 0.01
    unscaled = TV(weight=lam, weight_mode="unscaled", iterations=50).solve(A, y, None, 0.0)
    relative = TV(weight=lam / sigma, iterations=50).solve(A, y, None, sigma)
    assert unscaled.options["effective_weight"] == pytest.approx(lam)
    assert torch.allclose(unscaled.image, relative.image, atol=1e-12)
    # weight 0 is plain constrained least squares at any sigma
    TV(weight=0.0, iterations=5).solve(A, y, None, 0.0)


def test_flow_start_tv_needs_a_positive_sigma():
    A, y, _ = _mask_problem()
    with pytest.raises(ValueError, match="init='tv' needs the noise level sigma > 0"):
        OTODE(init="tv", steps=2).solve(A, y, _prior(), 0.0)


# --------------------------------------------------------------------------- one CG
def test_conjugate_gradient_stopping_rules():
    """``stop="item"`` freezes converged items, ``stop="batch"`` runs every item until all
    have converged; both solve the system, and for one item they are the same iteration."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 16, generator=g, dtype=DT)
    H = W.T @ W + 0.1 * torch.eye(16, dtype=DT)
    b = torch.randn(3, 1, 16, generator=g, dtype=DT)
    b[1] *= 1e-8                                         # an item that converges at once

    def apply(v):
        return (v.reshape(-1, 16) @ H).reshape(v.shape)

    ref = torch.linalg.solve(H, b.reshape(3, 16).T).T.reshape(b.shape)
    x_item, n_item = conjugate_gradient(apply, b, iterations=100, tol=1e-12, count=True)
    x_batch, n_batch = conjugate_gradient(apply, b, iterations=100, tol=1e-12, stop="batch",
                                          count=True)
    assert torch.allclose(x_item, ref, atol=1e-8) and torch.allclose(x_batch, ref, atol=1e-8)
    assert n_item == n_batch <= 16
    one_item = conjugate_gradient(apply, b[:1], iterations=7)
    one_batch = conjugate_gradient(apply, b[:1], iterations=7, stop="batch")
    assert torch.equal(one_item, one_batch)
    with pytest.raises(ValueError, match="stop"):
        conjugate_gradient(apply, b, stop="never")


def test_dense_otode_uses_the_batch_rule_cg():
    """OT-ODE's CG (no closed form) reports the iterations it ran."""
    g = torch.Generator().manual_seed(1)
    A = Dense(torch.randn(40, 64, generator=g, dtype=DT) / 8, 8)
    y = A(torch.rand(2, 1, 8, 8, generator=g, dtype=DT))
    res = OTODE(steps=3, cg_iters=4).solve(A, y, _prior(), 0.01)
    assert all(0 < h["cg_iterations"] <= 4 for h in res.history[:-1])
