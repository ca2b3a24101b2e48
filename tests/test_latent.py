"""Latent flow priors: the prior type, its files, the data step through a decoder, MS-Flow and
D-Flow through ``ctflow.reconstruct``, and the autoencoder training/bundling path.

Small models only (built here, random or trained for a few steps); nothing reads the shared data folder.
"""
import json

import pytest
import torch

import ctflow.solvers as common
from ctflow.flow import GaussianVelocity, integrate
from ctflow.flow.autoencoder import AutoEncoder, LatentCodec
from ctflow.training.datasets import ellipses_dataset
from ctflow.flow.unet import UNet
from ctflow.operators import Inpainting, LinearOperator
from ctflow.priors import FlowPrior, LatentFlowPrior, load_prior, save_latent_prior
from ctflow.priors.checkpoint import CheckpointError
from ctflow.solvers import reconstruct
from ctflow.solvers.latent import LatentDataProblem

DT = torch.float64


class Dense(LinearOperator):
    name = "Dense"

    def __init__(self, W, n):
        super().__init__((n, n), (W.shape[0],))
        self.W, self.n = W, n

    def _forward(self, x):
        return x.reshape(*x.shape[:2], -1) @ self.W.T.to(x)

    def _adjoint(self, y):
        return (y @ self.W.to(y)).reshape(*y.shape[:2], self.n, self.n)


def tiny_latent_prior(image_size=16, seed=0):
    torch.manual_seed(seed)
    codec = LatentCodec(AutoEncoder(base=4, channel_mults=(1, 2), image_size=image_size))
    net = UNet(channels=4, base=8, channel_mults=(1, 2), attention_levels=(), image_size=None)
    lat = codec.autoencoder.latent_shape(image_size)
    with torch.no_grad():   # the U-Net's output layer starts at zero: give it a real field
        net.out_conv.weight.normal_(0, 0.05)
    prior = LatentFlowPrior(net, decoder=codec.decode, encoder=codec.encode,
                            image_size=image_size, latent_shape=lat, name="tiny-latent")
    prior.codec = codec
    return prior.eval()


def affine_pair(n=8, seed=0, a=4.0, b=-2.0):
    """An image-space Gaussian prior with normalisation (a, b) and the same prior written as a
    latent prior whose decoder/encoder are that normalisation."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(1, n, n, generator=g, dtype=DT) - 0.5
    sig = 0.6 + 0.4 * torch.rand(1, n, n, generator=g, dtype=DT)
    vel = GaussianVelocity(mu, sig)
    image = FlowPrior(vel, image_size=n, scale=a, shift=b)
    latent = LatentFlowPrior(vel, decoder=lambda z: (z - b) / a, encoder=lambda x: a * x + b,
                             image_size=n, latent_shape=(1, n, n))
    return image, latent, mu, sig, g


# ------------------------------------------------------------------------------ prior type
def test_latent_prior_maps_shapes_and_errors():
    prior = tiny_latent_prior()
    x = torch.rand(2, 1, 16, 16)
    z = prior.to_model(x)
    assert z.shape == (2, 4, 8, 8) and not z.requires_grad
    assert prior.from_model(z).shape == (2, 1, 16, 16)
    assert prior.is_latent and prior.shape == (1, 16, 16) and prior.latent_shape == (4, 8, 8)
    assert prior.sample(2, steps=2, generator=torch.Generator().manual_seed(0)).shape == \
        (2, 1, 16, 16)
    with pytest.raises(ValueError, match="latents must have shape"):
        prior.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images must have shape"):
        prior.encode(torch.zeros(1, 1, 8, 8))
    bare = LatentFlowPrior(prior.velocity, decoder=prior.decoder, image_size=16,
                           latent_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="no encoder"):
        bare.to_model(x)
    # gradients reach the latent through the decoder even with frozen decoder weights
    zg = z.clone().requires_grad_(True)
    prior.decode(zg).sum().backward()
    assert zg.grad is not None and float(zg.grad.abs().sum()) > 0
    # a float64 latent through float32 modules comes back in float64
    assert prior.decode(z.double()).dtype == torch.float64


def test_codec_normalisation_is_per_channel_standardisation():
    torch.manual_seed(1)
    codec = LatentCodec(AutoEncoder(base=4, channel_mults=(1, 2), image_size=16))
    imgs = torch.rand(12, 1, 16, 16)
    codec.fit_normalisation(imgs, batch_size=5)
    z = codec.encode(imgs)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    raw = codec.autoencoder.encode(imgs)
    assert torch.allclose(codec.decode(z), codec.autoencoder.decode(raw), atol=1e-5)


# ------------------------------------------------------------------------------ data step
def test_latent_data_step_reaches_the_linear_least_squares_solution():
    """With a linear decoder D(z) = W z + c the block problem is a linear least-squares
    problem; the monotone gradient steps must reach its normal-equation solution."""
    g = torch.Generator().manual_seed(3)
    n, m, L = 6, 20, 2 * 3 * 3
    Wd = torch.randn(n * n, L, generator=g, dtype=DT) / 3
    c = torch.randn(n * n, generator=g, dtype=DT) * 0.1
    A = Dense(torch.randn(m, n * n, generator=g, dtype=DT) / n, n)

    def decoder(z):
        return (z.reshape(z.shape[0], -1) @ Wd.T + c).reshape(z.shape[0], 1, n, n)

    prior = LatentFlowPrior(lambda z, t: torch.zeros_like(z), decoder=decoder, image_size=n,
                            latent_shape=(2, 3, 3))
    y = torch.randn(2, 1, m, generator=g, dtype=DT)
    sigma, rho = 0.3, 5.0
    p = torch.randn(2, 2, 3, 3, generator=g, dtype=DT)
    prob = common.make_problem(A, y, prior, sigma)
    assert isinstance(prob, LatentDataProblem)
    z, how = common.data_step(prob, p, rho, torch.zeros_like(p), iterations=400, tol=0)
    assert how == "gradient"
    # normal equations: (J^T A^T A J / s^2 + rho I) z = J^T A^T (y - A c) / s^2 + rho p
    J = A.W @ Wd
    H = J.T @ J / sigma ** 2 + rho * torch.eye(L, dtype=DT)
    rhs = (y.reshape(2, m) - (A.W @ c)) @ J / sigma ** 2 + rho * p.reshape(2, L)
    exact = torch.linalg.solve(H, rhs.T).T.reshape(p.shape)
    assert torch.allclose(z, exact, atol=1e-8, rtol=1e-8)


def test_latent_data_step_never_increases_its_objective():
    prior = tiny_latent_prior()
    from ctflow.operators import ParallelBeam2D, RayTransform
    A = RayTransform(ParallelBeam2D(image_size=16, angles=8))
    g = torch.Generator().manual_seed(0)
    y = A(torch.rand(2, 1, 16, 16, generator=g))
    prob = LatentDataProblem(A, y, prior, 0.05)
    p = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)

    def f(zz):
        return prob.data(zz) + 0.5 * 100.0 * common.per_item_sq(zz - p)

    before = f(z)
    for _ in range(3):
        z_new, _ = prob.solve_data_step(p, 100.0, z, iterations=4)
        after = f(z_new)
        assert bool((after <= before + 1e-6 * before.abs()).all())
        z, before = z_new, after
    assert prob.steps_taken > 0


# ------------------------------------------------------------------------------ solvers
def test_latent_dflow_equals_image_space_dflow_for_an_affine_decoder():
    """A latent prior whose decoder is the image prior's normalisation poses the same D-Flow
    problem; L-BFGS must follow the same path."""
    image, latent, mu, sig, g = affine_pair()
    A = Dense(torch.randn(40, 64, generator=g, dtype=DT) / 8, 8)
    x = image.from_model((mu + sig * torch.randn(1, 8, 8, generator=g, dtype=DT))[None])
    y = A(x) + 0.01 * torch.randn(1, 1, 40, generator=g, dtype=DT)
    opts = dict(N=6, iterations=3, max_iter=5, alpha=0.5, init="adjoint", seed=2)
    r_img = reconstruct(y, A, image, method="dflow", sigma=0.01, **opts)
    r_lat = reconstruct(y, A, latent, method="dflow", sigma=0.01, **opts)
    assert torch.allclose(r_img.image, r_lat.image, atol=1e-7)
    assert r_lat.history[-1]["objective"] == pytest.approx(r_img.history[-1]["objective"],
                                                           rel=1e-7)


def test_latent_msflow_matches_image_space_msflow_for_an_affine_decoder():
    """Same equivalence for MS-Flow: the latent data step (gradient steps through the decoder)
    converges to the image-space closed-form data step (inpainting mask)."""
    image, latent, mu, sig, g = affine_pair(seed=1)
    A = Inpainting(8, mask=(torch.rand(8, 8, generator=g) > 0.4).to(DT))
    x = image.from_model((mu + sig * torch.randn(1, 8, 8, generator=g, dtype=DT))[None])
    y = A(x) + 0.02 * torch.randn(1, 1, 8, 8, generator=g, dtype=DT)
    for update in ("jacobian-free", "exact"):
        opts = dict(K=3, M=2, sweeps=4, rho=50.0, alpha=0.7, init="adjoint", update=update,
                    seed=1)
        # the image prior's data step is closed-form (a mask); the latent one takes
        # decoder_steps gradient steps through the decoder
        r_img = reconstruct(y, A, image, method="msflow", sigma=0.02, **opts)
        r_lat = reconstruct(y, A, latent, method="msflow", sigma=0.02, decoder_steps=300,
                            decoder_tol=0.0, **opts)
        assert torch.allclose(r_img.image, r_lat.image, atol=1e-6), update
        for h_i, h_l in zip(r_img.history, r_lat.history):
            assert h_l["objective"] == pytest.approx(h_i["objective"], rel=1e-6)


def test_latent_msflow_exact_gauss_seidel_descends_and_dflow_improves():
    prior = tiny_latent_prior()
    from ctflow.operators import ParallelBeam2D, RayTransform
    A = RayTransform(ParallelBeam2D(image_size=16, angles=10))
    g = torch.Generator().manual_seed(1)
    y = A(torch.rand(1, 1, 16, 16, generator=g))
    sigma = 0.05 * float(y.abs().mean())
    r = reconstruct(y, A, prior, method="msflow", sigma=sigma, K=3, M=2, sweeps=3,
                    update="exact", inner_iters=2, decoder_steps=5)
    obj = [h["objective"] for h in r.history]
    assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(obj, obj[1:])), obj
    assert obj[-1] < obj[0]
    assert r.image.shape == (1, 1, 16, 16) and bool(torch.isfinite(r.image).all())
    for sweep in ("jacobi",):
        rj = reconstruct(y, A, prior, method="msflow", sigma=sigma, K=3, M=2, sweeps=2,
                         sweep=sweep)
        assert rj.history[-1]["data"] < rj.history[0]["data"]
    d = reconstruct(y[0], A, prior, method="dflow", sigma=sigma, N=4, iterations=2)
    assert d.image.shape == (1, 16, 16)             # the layout of y comes back
    assert d.history[-1]["objective"] < d.history[0]["objective"]
    assert d.nfe["backward"] > 0


def test_blend_init_draws_latent_noise_and_encodes():
    prior = tiny_latent_prior()
    x = torch.rand(2, 1, 16, 16)
    v = common.SolverVelocity(prior, torch.device("cpu"))
    s0 = common.blend_init(v, prior, x, alpha=0.0, steps=2, method="euler",
                           generator=common.make_generator(0))
    assert s0.shape == (2, 4, 8, 8)
    s1 = common.blend_init(v, prior, x, alpha=1.0, steps=2, method="euler",
                           generator=common.make_generator(0))
    back = integrate(prior.velocity, prior.to_model(x), 1.0, 0.0, 2, "euler")
    assert torch.allclose(s1, back, atol=1e-6)


@pytest.mark.parametrize("method", ["pnpflow", "otode"])
def test_other_methods_refuse_latent_priors(method):
    prior = tiny_latent_prior()
    A = Inpainting(16, mask=torch.ones(16, 16))
    with pytest.raises(ValueError, match="latent prior"):
        reconstruct(torch.rand(1, 1, 16, 16), A, prior, method=method, sigma=0.1)


# ------------------------------------------------------------------------------ files
def test_latent_prior_file_round_trip_and_checks(tmp_path):
    prior = tiny_latent_prior()
    stem = tmp_path / "lat"
    path = save_latent_prior(prior.velocity, prior.codec, stem, image_size=16,
                             hu_window=(-1000.0, 1000.0), name="lat",
                             training={"note": "test"})
    meta = json.loads(path.read_text())
    assert meta["kind"] == "latent" and meta["latent_shape"] == [4, 8, 8]
    loaded = load_prior(str(path))
    assert isinstance(loaded, LatentFlowPrior) and loaded.hu_window == (-1000.0, 1000.0)
    z = torch.randn(2, 4, 8, 8)
    t = torch.rand(2)
    assert torch.allclose(loaded.velocity(z, t), prior.velocity(z, t), atol=1e-6)
    assert torch.allclose(loaded.decode(z), prior.decode(z), atol=1e-6)
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(loaded.encode(x), prior.encode(x), atol=1e-6)
    # a description that disagrees with the weights is refused, naming the file
    bad = dict(meta)
    bad["latent_shape"] = [4, 4, 4]
    (tmp_path / "bad.json").write_text(json.dumps({**bad, "weights": "lat.safetensors"}))
    with pytest.raises(CheckpointError, match="latent_shape"):
        load_prior(str(tmp_path / "bad.json"))
    bad = dict(meta)
    bad["autoencoder"] = {**meta["autoencoder"], "base": 8}
    (tmp_path / "bad2.json").write_text(json.dumps({**bad, "weights": "lat.safetensors"}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_prior(str(tmp_path / "bad2.json"))


def test_autoencoder_training_resumes_exactly_and_bundles(tmp_path):
    from ctflow.training.datasets import ImageTensorDataset
    from ctflow.training.prior import train_prior
    from ctflow.training.autoencoder import (bundle_latent, encode_pool, load_autoencoder,
                                               read_codec, train_autoencoder, write_codec)
    ds = ellipses_dataset(6, image_size=16, seed=0)

    def model():
        torch.manual_seed(0)
        return AutoEncoder(base=4, channel_mults=(1, 2), image_size=16)

    kw = dict(batch_size=3, crop=8, checkpoint_every=2, log_every=1, seed=0)
    full = train_autoencoder(ds, out_dir=tmp_path / "a", steps=4, model=model(), **kw)
    train_autoencoder(ds, out_dir=tmp_path / "b", steps=2, model=model(), **kw)
    resumed = train_autoencoder(ds, out_dir=tmp_path / "b", steps=4, model=model(), **kw)
    assert resumed.step == 4
    for (k, v), (_, w) in zip(full.model.state_dict().items(),
                              resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    ae, meta = load_autoencoder(tmp_path / "b")
    assert meta["step"] == 4 and meta["kind"] == "autoencoder"
    codec = LatentCodec(ae)
    codec.fit_normalisation(ds._plain)
    codes = encode_pool(codec, ds, repeats=2, seed=0)
    assert codes.shape == (12, 4, 8, 8)
    run = tmp_path / "flow"
    run.mkdir()
    write_codec(codec, run / "codec", meta={"image_size": 16, "hu_window": None})
    assert torch.equal(read_codec(run / "codec")[0].mean, codec.mean)
    net = UNet(channels=4, base=8, channel_mults=(1, 2), attention_levels=(), image_size=8)
    train_prior(ImageTensorDataset(codes), out_dir=run, steps=2, batch_size=4, model=net,
                scale=1.0, shift=0.0, checkpoint_every=1, warmup_steps=1)
    path = bundle_latent(run, tmp_path / "bundle" / "tinylat", name="tinylat")
    prior = load_prior(str(path))
    assert isinstance(prior, LatentFlowPrior) and prior.latent_shape == (4, 8, 8)
    assert json.loads(path.read_text())["training"]["flow"]["steps"] == 2
    with pytest.raises(CheckpointError, match="codec"):
        load_prior(str(run / "codec.json"))
