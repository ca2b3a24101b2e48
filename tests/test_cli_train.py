"""``ctflow train autoencoder`` -> ``latent-flow`` -> ``latent-bundle`` on a few DICOM slices."""
from __future__ import annotations

import json

import torch

from helpers import REPO

CHEST = REPO / "ctflow" / "data" / "samples" / "chest-subset"


def test_latent_prior_trainers(tmp_path, capsys):
    from ctflow.cli import main
    from ctflow.priors import LatentFlowPrior, load_prior

    data = [str(CHEST), "--image-size", "16", "--batch-size", "2", "--log-every", "1",
            "--checkpoint-every", "2", "--name", "tinylat"]
    ae = tmp_path / "ae"
    assert main(["--device", "cpu", "train", "autoencoder", *data, "--out", str(ae),
                 "--steps", "2", "--crop", "8", "--base", "4", "--channel-mults", "1,2"]) == 0
    meta = json.loads((ae / "ckpt-00000002.json").read_text())
    assert meta["kind"] == "autoencoder" and meta["name"] == "tinylat-autoencoder"
    assert meta["commands"][0].startswith("ctflow --device cpu train autoencoder")
    flow = tmp_path / "flow"
    assert main(["--device", "cpu", "train", "latent-flow", *data, "--autoencoder", str(ae),
                 "--out", str(flow), "--steps", "2", "--repeats", "1", "--base", "8",
                 "--channel-mults", "1,2", "--attention-levels", "", "--warmup-steps",
                 "1"]) == 0
    out = capsys.readouterr().out
    assert "codes" in out and "step 2" in out
    codec = json.loads((flow / "codec.json").read_text())
    assert codec["image_size"] == 16 and codec["hu_window"] == [-1024.0, 1024.0]
    assert codec["training"]["steps"] == 2
    dest = tmp_path / "p" / "tinylat"
    dest.parent.mkdir()
    assert main(["train", "latent-bundle", str(flow), "--name", "tinylat", "--dest",
                 str(dest)]) == 0
    prior = load_prior(str(dest) + ".json")
    assert isinstance(prior, LatentFlowPrior) and prior.image_size == 16
    x = prior.sample(1, steps=1, method="euler")
    assert x.shape == (1, 1, 16, 16) and torch.isfinite(x).all()
