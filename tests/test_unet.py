"""The U-Net velocity model: shapes, config round trip, parameter budget, input checks."""
import json

import pytest
import torch

from ctflow.flow.unet import UNet, timestep_embedding


def tiny(**kw):
    cfg = dict(base=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
               num_heads=2, image_size=16)
    cfg.update(kw)
    return UNet(**cfg)


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_default_size_budget():
    m = UNet()
    n = m.num_parameters()
    assert 2_000_000 <= n <= 5_000_000, n
    x = torch.randn(2, 1, 64, 64)
    out = m(x, torch.rand(2))
    assert out.shape == x.shape


def test_zero_initialised_output():
    m = tiny()
    out = m(torch.randn(3, 1, 16, 16), torch.rand(3))
    assert torch.count_nonzero(out) == 0  # the last conv starts at zero: v = 0


def test_config_json_round_trip_and_same_function():
    m = perturb(tiny(channels=2, attention_levels=(0, 1), dropout=0.0))
    cfg = json.loads(json.dumps(m.config))
    m2 = UNet.from_config(cfg)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 2, 16, 16)
    t = torch.tensor([0.1, 0.9])
    assert torch.equal(m(x, t), m2(x, t))


def test_time_dependence_and_scalar_time():
    m = perturb(tiny()).eval()
    x = torch.randn(2, 1, 16, 16)
    a = m(x, torch.full((2,), 0.2))
    b = m(x, torch.full((2,), 0.8))
    assert (a - b).abs().max() > 1e-4
    assert torch.allclose(m(x, torch.tensor(0.2)), a)
    # batch items are independent (GroupNorm, no batch statistics)
    assert torch.allclose(m(x[:1], torch.full((1,), 0.2)), a[:1], atol=1e-6)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert timestep_embedding(torch.tensor([0.3]), 7).shape == (1, 7)


def test_input_checks():
    m = tiny()
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 3, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(2, 1, 15, 15), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        m(torch.randn(2, 1, 16, 16), torch.rand(3))
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=30)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(attention_levels=(7,))
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNet.from_config({**tiny().config, "width": 3})
    with pytest.raises(ValueError, match="not a UNet"):
        UNet.from_config({"type": "DiT"})


def test_gradients_flow_to_all_parameters():
    m = perturb(tiny())
    x = torch.randn(2, 1, 16, 16)
    m(x, torch.rand(2)).pow(2).sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
