"""Checkpoints: exact round trip, and clear errors for missing, corrupt and mismatched files."""
import json
import struct

import pytest
import torch

from ctflow.flow.unet import UNet
from ctflow.priors import CheckpointError, FlowPrior, load_prior, save_prior
from ctflow.priors.checkpoint import check_safetensors_file, read_checkpoint

TINY = dict(base=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=2, image_size=16)


def make_prior():
    torch.manual_seed(0)
    m = UNet(**TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return FlowPrior(m, image_size=16, scale=2.0, shift=-1.0, hu_window=(-1000.0, 400.0),
                     name="tiny")


@pytest.fixture()
def saved(tmp_path):
    prior = make_prior()
    path = save_prior(prior, tmp_path / "tiny", data={"patients": ["P1"]},
                      training={"steps": 5, "final_loss": 0.5})
    return prior, tmp_path / "tiny", path


def test_round_trip_exact(saved):
    prior, stem, json_path = saved
    assert json_path == stem.with_suffix(".json")
    for ref in (stem, str(stem) + ".json", str(stem) + ".safetensors"):
        q = load_prior(ref)
        sa, sb = prior.velocity.state_dict(), q.velocity.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert (q.image_size, q.channels, q.scale, q.shift) == (16, 1, 2.0, -1.0)
        assert q.hu_window == (-1000.0, 400.0) and q.name == "tiny"
        assert not q.velocity.training
        assert not any(p.requires_grad for p in q.velocity.parameters())
        x = torch.randn(2, 1, 16, 16)
        t = torch.tensor([0.3, 0.7])
        assert torch.equal(prior.velocity.eval()(x, t), q(x, t))
    meta = json.loads(json_path.read_text())
    assert meta["data"] == {"patients": ["P1"]} and meta["training"]["steps"] == 5
    assert meta["model"] == prior.velocity.config and len(meta["sha256"]) == 64
    assert meta["ctflow_version"]


def test_float16_weights(tmp_path):
    prior = make_prior()
    save_prior(prior, tmp_path / "h", dtype=torch.float16)
    q = load_prior(tmp_path / "h")
    for k, v in prior.velocity.state_dict().items():
        w = q.velocity.state_dict()[k]
        assert w.dtype == torch.float32
        assert torch.equal(w, v.half().float())


def test_missing_files(saved, tmp_path):
    _, stem, _ = saved
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_prior(tmp_path / "nothere")
    stem.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tiny.safetensors"):
        load_prior(stem)


def test_truncated_weights(saved):
    _, stem, _ = saved
    w = stem.with_suffix(".safetensors")
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*truncated"):
        load_prior(stem)
    w.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        check_safetensors_file(w)
    (n,) = struct.unpack("<Q", data[:8])
    w.write_bytes(data[: 8 + n // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_prior(stem)


def test_corrupt_bytes_fail_checksum(saved):
    _, stem, _ = saved
    w = stem.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # same size, different weights
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: SHA-256 mismatch"):
        load_prior(stem)


def test_bad_json(saved):
    _, stem, json_path = saved
    json_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tiny\.json: not valid JSON"):
        load_prior(stem)
    json_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a ctflow checkpoint"):
        load_prior(stem)


def test_mismatched_config(saved):
    _, stem, json_path = saved
    meta = json.loads(json_path.read_text())
    meta["model"]["base"] = 16  # every conv now has other shapes
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: weights do not match.*"
                                              r"shape mismatch"):
        load_prior(stem)
    meta["model"]["base"] = 8
    meta["model"]["num_res_blocks"] = 2  # extra blocks: tensors missing from the file
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_prior(stem)
    meta["model"]["num_res_blocks"] = 1
    meta["model"]["nonsense"] = 1
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid architecture config"):
        load_prior(stem)


def test_unknown_bundled_name_lists_names():
    with pytest.raises(ValueError, match="no bundled prior named 'nope'"):
        load_prior("nope")


def test_no_pickle_and_bare_module(tmp_path):
    m = UNet(**TINY)
    with pytest.raises(ValueError, match="image_size"):
        save_prior(m, tmp_path / "m")
    save_prior(m, tmp_path / "m", image_size=16)
    tensors, meta = read_checkpoint(tmp_path / "m")
    assert meta["scale"] == 2.0 and meta["shift"] == -1.0 and meta["hu_window"] is None
    # the weights file is a safetensors file: 8-byte header length + JSON header
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])
    with pytest.raises(ValueError, match="nn.Module"):
        save_prior(FlowPrior(lambda x, t: x, image_size=4), tmp_path / "g")


def test_weights_name_must_stay_beside_description(saved):
    _, stem, json_path = saved
    meta = json.loads(json_path.read_text())
    meta["weights"] = "../elsewhere.safetensors"
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="file name beside"):
        load_prior(stem)


def test_plain_name_in_working_folder(saved, monkeypatch):
    prior, stem, _ = saved
    monkeypatch.chdir(stem.parent)
    q = load_prior("tiny")  # not a bundled name, but tiny.json is here
    assert q.name == "tiny"
