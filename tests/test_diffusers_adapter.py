"""The Stable Diffusion 3 adapter (``ctflow.priors.from_diffusers``) on tiny randomly
initialised diffusers models built from configs (nothing downloads)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ctflow.flow import GaussianVelocity, integrate  # noqa: E402
from ctflow.operators import ParallelBeam2D, RayTransform  # noqa: E402
from ctflow.priors import LatentFlowPrior, from_diffusers  # noqa: E402
from ctflow.priors.diffusers_adapter import (model_output_from_velocity,  # noqa: E402
                                             sigma_to_t, t_to_sigma,
                                             velocity_from_model_output)
from ctflow.solvers import reconstruct  # noqa: E402


def tiny_components(seed=0):
    torch.manual_seed(seed)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=1.5305, shift_factor=0.0609)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(seed + 1)
    pe, pp = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    return tr.eval(), vae.eval(), sch, pe, pp


@pytest.fixture(scope="module")
def parts():
    return tiny_components()


def transformer_output(tr, z, timestep, pe, pp):
    B = z.shape[0]
    with torch.no_grad():
        return tr(hidden_states=z, timestep=timestep.expand(B), encoder_hidden_states=pe.expand(
            B, -1, -1), pooled_projections=pp.expand(B, -1), return_dict=False)[0]


def test_one_euler_step_equals_one_scheduler_step(parts):
    """Acceptance 1: a ctflow Euler step through the adapter equals a diffusers scheduler step
    on the same tiny model and inputs (within 1e-5), at several points of the SD3 schedule."""
    tr, vae, sch, pe, pp = parts
    prior = from_diffusers(transformer=tr, vae=vae, scheduler=sch, prompt_embeds=pe,
                           pooled_prompt_embeds=pp)
    assert isinstance(prior, LatentFlowPrior) and prior.latent_shape == (4, 8, 8)
    sch.set_timesteps(12)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for i in (0, 3, 7, 11):
        t, s0, s1 = sch.timesteps[i], float(sch.sigmas[i]), float(sch.sigmas[i + 1])
        sch._step_index = i
        u = transformer_output(tr, z, t, pe, pp)
        ref = sch.step(u, t, z, return_dict=False)[0]
        with torch.no_grad():
            ours = integrate(prior.velocity, z, sigma_to_t(s0), sigma_to_t(s1), 1, "euler")
        assert (ours - ref).abs().max() <= 1e-5, i


def test_time_and_sign_conversion_both_ways(parts):
    tr, vae, sch, pe, pp = parts
    prior = from_diffusers(transformer=tr, vae=vae, scheduler=sch, prompt_embeds=pe,
                           pooled_prompt_embeds=pp)
    g = torch.Generator().manual_seed(2)
    # ctflow -> diffusers: v(z, t) = -u(z, timestep = 1000 (1 - t))
    t = torch.tensor([0.1, 0.75])
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        v = prior.velocity(z, t)
    u = torch.cat([transformer_output(tr, z[i:i + 1], 1000 * t_to_sigma(t[i:i + 1]), pe, pp)
                   for i in range(2)])
    assert torch.allclose(v, -u, atol=1e-6)
    assert torch.allclose(model_output_from_velocity(v), u, atol=1e-6)
    assert torch.allclose(velocity_from_model_output(model_output_from_velocity(v)), v)
    assert float(sigma_to_t(t_to_sigma(torch.tensor(0.3)))) == pytest.approx(0.3)
    # diffusers -> ctflow: the scheduler's noising path is ctflow's interpolant with t = 1 - s
    sch.set_timesteps(10)
    data, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ts = sch.timesteps[4]
    s = float(sch.sigmas[4])
    noisy = sch.scale_noise(data, ts[None], noise)
    tt = sigma_to_t(s)
    assert torch.allclose(noisy, tt * data + (1 - tt) * noise, atol=1e-6)
    # ... and SD3's target (noise - data) is minus ctflow's target (data - noise)
    assert torch.equal(velocity_from_model_output(noise - data), data - noise)


def test_ctflow_velocity_driven_by_the_scheduler_equals_ctflow_integration():
    """The other way round: a ctflow velocity field (exact Gaussian flow) converted to SD3's
    model output and driven through the whole shifted scheduler gives ctflow's Euler
    integration on the same (non-uniform) time grid."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, 8, generator=g) * 0.3
    sd = 0.5 + torch.rand(4, 8, 8, generator=g)
    vel = GaussianVelocity(mu, sd)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(9)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for i, ts in enumerate(sch.timesteps):
        s = sch.sigmas[i]
        u = model_output_from_velocity(vel(x, sigma_to_t(s).expand(2)))
        x = sch.step(u, ts, x, return_dict=False)[0]
        ours = integrate(vel, ours, float(sigma_to_t(s)), float(sigma_to_t(sch.sigmas[i + 1])),
                         1, "euler")
    assert torch.allclose(x, ours, atol=1e-5)


def test_codec_uses_the_pipelines_latent_normalisation(parts):
    tr, vae, sch, pe, pp = parts
    prior = from_diffusers(transformer=tr, vae=vae, scheduler=sch, prompt_embeds=pe,
                           pooled_prompt_embeds=pp)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = prior.to_model(x)
        raw = vae.encode(2 * x.expand(-1, 3, -1, -1) - 1).latent_dist.mode()
        assert torch.allclose(z, (raw - 0.0609) * 1.5305, atol=1e-6)
        img = prior.from_model(z)
        ref = vae.decode(z / 1.5305 + 0.0609).sample
    assert img.shape == (2, 1, 16, 16)
    assert torch.allclose(img, 0.5 * (ref.mean(1, keepdim=True) + 1), atol=1e-6)
    rgb = from_diffusers(transformer=tr, vae=vae, prompt_embeds=pe, pooled_prompt_embeds=pp,
                         channels=3)
    assert rgb.channels == 3 and rgb.from_model(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        from_diffusers(transformer=tr, vae=vae, prompt_embeds=pe, pooled_prompt_embeds=pp,
                       channels=2)
    with pytest.raises(ValueError, match="divisible"):
        from_diffusers(transformer=tr, vae=vae, prompt_embeds=pe, pooled_prompt_embeds=pp,
                       image_size=18)


def test_guidance_and_zero_embeddings(parts):
    tr, vae, sch, pe, pp = parts
    g = torch.Generator().manual_seed(4)
    npe, npp = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    cond = from_diffusers(transformer=tr, vae=vae, prompt_embeds=pe, pooled_prompt_embeds=pp)
    neg = from_diffusers(transformer=tr, vae=vae, prompt_embeds=npe, pooled_prompt_embeds=npp)
    cfg = from_diffusers(transformer=tr, vae=vae, prompt_embeds=pe, pooled_prompt_embeds=pp,
                         negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp,
                         guidance_scale=3.0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        vc, vn, vg = cond.velocity(z, t), neg.velocity(z, t), cfg.velocity(z, t)
    assert torch.allclose(vg, vn + 3.0 * (vc - vn), atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        from_diffusers(transformer=tr, vae=vae, guidance_scale=2.0)
    zero = from_diffusers(transformer=tr, vae=vae, zero_sequence_length=3)
    assert zero.velocity.prompt_embeds.shape == (1, 3, 16)
    assert float(zero.velocity.prompt_embeds.abs().sum()) == 0.0
    with torch.no_grad():
        assert torch.isfinite(zero.velocity(z, t)).all()


def test_loads_from_a_local_folder_without_network(parts, tmp_path, monkeypatch):
    tr, vae, sch, pe, pp = parts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tr.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    sch.save_pretrained(tmp_path / "scheduler")
    prior = from_diffusers(tmp_path, prompt_embeds=pe, pooled_prompt_embeds=pp)
    ref = from_diffusers(transformer=tr, vae=vae, scheduler=sch, prompt_embeds=pe,
                         pooled_prompt_embeds=pp)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([0.4])
    with torch.no_grad():
        assert torch.allclose(prior.velocity(z, t), ref.velocity(z, t), atol=1e-6)
        assert torch.allclose(prior.decode(z), ref.decode(z), atol=1e-6)
    assert prior.image_size == 16 and prior.config["path"] == str(tmp_path)
    # load_prior (and so ctflow.reconstruct with a prior given by path) takes the folder too
    from ctflow.priors import load_prior
    by_path = load_prior(str(tmp_path))
    assert isinstance(by_path, LatentFlowPrior) and by_path.latent_shape == (4, 8, 8)
    A = RayTransform(ParallelBeam2D(image_size=16, angles=6))
    y = A(torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    res = reconstruct(y, A, str(tmp_path), method="msflow", sigma=0.05, K=2, M=1,
                      sweeps=1, decoder_steps=2)
    assert res.image.shape == (1, 1, 16, 16)
    with pytest.raises(FileNotFoundError, match="not found"):
        from_diffusers(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="transformer"):
        from_diffusers(tmp_path / "empty")


def test_msflow_and_dflow_run_through_the_adapter(parts):
    """Acceptance 4 (API part): the adapter works through ctflow.reconstruct unchanged."""
    tr, vae, sch, pe, pp = parts
    prior = from_diffusers(transformer=tr, vae=vae, scheduler=sch, prompt_embeds=pe,
                           pooled_prompt_embeds=pp)
    A = RayTransform(ParallelBeam2D(image_size=16, angles=8))
    y = A(torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    ms = reconstruct(y, A, prior, method="msflow", sigma=0.05, K=2, M=2, sweeps=2,
                     decoder_steps=3)
    assert ms.image.shape == (1, 1, 16, 16) and torch.isfinite(ms.image).all()
    assert ms.history[-1]["data"] < ms.history[0]["data"]
    df = reconstruct(y, A, prior, method="dflow", sigma=0.05, N=3, iterations=1,
                     max_iter=3)
    assert df.history[-1]["objective"] < df.history[0]["objective"]
    assert df.nfe["backward"] > 0


def test_reconstruct_dicom_cli_takes_a_diffusers_folder(parts, tmp_path, capsys):
    """Acceptance 4 (command line): ``ctflow reconstruct-dicom --prior <SD3 folder>``."""
    import shutil
    from pathlib import Path

    import pydicom

    from ctflow.cli import main
    tr, vae, sch, pe, pp = parts
    model = tmp_path / "sd3"
    tr.save_pretrained(model / "transformer")
    vae.save_pretrained(model / "vae")
    sch.save_pretrained(model / "scheduler")
    chest = Path(__file__).resolve().parents[1] / "ctflow" / "data" / "samples" / "chest-subset"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy2(sorted(chest.glob("*.dcm"))[0], src)
    out = tmp_path / "out"
    rc = main(["--quiet", "reconstruct-dicom", str(src), str(out), "--method", "msflow",
               "--prior", str(model), "--views", "8", "--option", "K=2", "--option", "M=1",
               "--option", "sweeps=1", "--option", "decoder_steps=2"])
    assert rc == 0, capsys.readouterr().err
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).Rows == 512        # written back at the input size
    import json
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["size"] == 16 and settings["method"] == "msflow"
