"""Size-agnostic priors: a fully convolutional velocity with per-pixel normalisation, trained on
patches, saved and loaded without an image size, used at several image sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ctflow
from ctflow.flow import UNet
from ctflow.operators import GaussianBlur
from ctflow.priors import FlowPrior, load_prior, save_prior
from ctflow.training import PatchDataset, bundle_checkpoint, train_prior
from ctflow.training.patches import TrainingSlice


def _net(norm="channel"):
    torch.manual_seed(0)
    net = UNet(base=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(),
               mid_attention=False, norm=norm, image_size=None)
    for p in net.parameters():       # random, non-zero weights (the output conv starts at 0)
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_channel_norm_features_are_local_group_norm_ones_are_not():
    """Per-pixel normalisation: the centre of a whole-image evaluation equals the centre of a
    crop's (away from the crop's borders); GroupNorm's image statistics break this."""
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5])
    crop = x[..., 12:52, 12:52]
    with torch.no_grad():
        for norm, local in (("channel", True), ("group", False)):
            net = _net(norm)
            whole = net(x, t)[..., 28:36, 28:36]
            part = net(crop, t)[..., 16:24, 16:24]
            err = float((whole - part).abs().max() / whole.abs().max())
            assert (err < 1e-5) == local, (norm, err)


def test_prior_fits_any_multiple_and_round_trips(tmp_path):
    prior = FlowPrior(_net(), image_size=None, size_multiple=2, pixel_mm=(0.6, 2.0),
                      hu_window=(-1024.0, 2000.0), name="tiny")
    assert prior.size_agnostic and prior.fits(16) and prior.fits(18) and not prior.fits(17)
    with pytest.raises(ValueError, match="size-agnostic"):
        prior.shape
    assert prior.shape_for(16) == (1, 16, 16)
    assert prior.sample(2, steps=2, size=16).shape == (2, 1, 16, 16)
    path = save_prior(prior, tmp_path / "tiny")
    meta = json.loads(path.read_text())
    assert meta["image_size"] is None and meta["size_multiple"] == 2
    assert meta["pixel_mm"] == [0.6, 2.0]
    back = load_prior(path)
    assert back.image_size is None and back.size_multiple == 2 and back.pixel_mm == (0.6, 2.0)
    x = torch.randn(1, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(back.velocity(x, torch.tensor([0.3])),
                           prior.velocity(x, torch.tensor([0.3])))


@pytest.mark.parametrize("size", [16, 24])
def test_one_prior_reconstructs_at_several_sizes(size):
    prior = FlowPrior(_net(), image_size=None, size_multiple=2, name="tiny").eval()
    A = GaussianBlur(size, sigma=1.0)
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    y = A(x)
    r = ctflow.reconstruct(y, A, prior, method="msflow", sigma=0.01, K=2, M=1, sweeps=1)
    assert r.image.shape == (1, 1, size, size) and torch.isfinite(r.image).all()
    odd = GaussianBlur(15, sigma=1.0)
    with pytest.raises(ValueError, match="models any NxN, N a multiple of 2 images"):
        ctflow.reconstruct(odd(torch.rand(1, 1, 15, 15)), odd, prior, method="msflow",
                           sigma=0.01)


def test_patch_training_bundles_a_size_agnostic_prior(tmp_path):
    rng = np.random.default_rng(0)
    slices = [TrainingSlice(rng.uniform(-1000, 500, (40, 40)).astype(np.float32), (0.8, 0.8),
                            f"p{k}") for k in range(3)]
    data = PatchDataset(slices, patch_size=16, pixel_mm_range=(0.8, 1.6))
    res = train_prior(data, out_dir=tmp_path / "run", steps=2, batch_size=2, warmup_steps=1,
                      model=_net(), checkpoint_every=2, log_every=1,
                      hu_window=data.hu_window)
    assert res.prior.image_size is None and res.prior.size_multiple == 2
    path = bundle_checkpoint(tmp_path / "run", tmp_path / "p", name="p")
    prior = load_prior(path)
    assert prior.image_size is None and prior.pixel_mm == (0.8, 1.6)
    assert prior.hu_window == (-1024.0, 2000.0)


def test_list_priors_details_say_kind_size_and_pixel_size():
    names = ctflow.list_priors()
    details = ctflow.list_priors(details=True)
    assert [d["name"] for d in details] == names
    ct64 = next(d for d in details if d["name"] == "ct64")
    assert ct64["kind"] == "pixel" and ct64["image_size"] == 64
    assert ct64["hu_window"] == [-1024.0, 1024.0]
    assert {d["kind"] for d in details} <= {"pixel", "latent"}
