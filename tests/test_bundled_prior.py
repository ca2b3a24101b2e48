"""The bundled CT prior: loads offline by name, declares its preparation, samples finitely,
and was trained on patients disjoint from the held-out ones."""
import json

import pytest
import torch

import ctflow.priors as P
from ctflow.priors.registry import bundled_dir

NAME = "ct64"
TEST_PATIENTS = {"A058062", "A062055", "A067967", "A072894", "A098752"}
VALIDATION_PATIENTS = {"A048383", "A056642"}

bundled = pytest.mark.skipif(
    not (bundled_dir() / f"{NAME}.json").is_file(),
    reason=f"prior {NAME!r} not bundled yet (python -m ctflow.training.prior bundle runs/ct64 "
           f"--name {NAME})")


@bundled
def test_loads_by_name_and_samples():
    assert NAME in P.list_priors()
    prior = P.load_prior(NAME)
    assert prior.image_size == 64 and prior.channels == 1
    assert prior.hu_window == (-1024.0, 1024.0)
    assert (prior.scale, prior.shift) == (2.0, -1.0)
    assert not prior.velocity.training
    x = prior.sample(2, steps=3, method="euler", generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 64, 64) and bool(torch.isfinite(x).all())
    # a trained prior lands in (roughly) the public range, not at the noise scale
    assert float(x.abs().max()) < 3.0


@bundled
def test_training_split_is_disjoint_from_heldout_patients():
    meta = json.loads((bundled_dir() / f"{NAME}.json").read_text())
    data = meta["data"]
    excluded = set(data["exclude_patients"])
    assert TEST_PATIENTS | VALIDATION_PATIENTS <= excluded
    used = set()
    for src in data["sources"]:
        used |= set(src.get("patients", []))
    assert used, "no per-source patient record"
    assert not used & (TEST_PATIENTS | VALIDATION_PATIENTS)
    assert meta["training"]["steps"] > 0 and meta["training"]["loss_curve"]
    assert meta["hu_window"] == [-1024.0, 1024.0] and meta["image_size"] == 64


@bundled
def test_bundle_size_and_notices():
    w = bundled_dir() / f"{NAME}.safetensors"
    assert w.stat().st_size < 20 * 1024 * 1024
    for f in ("LICENSE.md", "PROVENANCE.md", "TCIA-LICENSE.txt", "LICENSE-Apache-2.0.txt"):
        assert (bundled_dir() / f).is_file(), f
    text = (bundled_dir() / "PROVENANCE.md").read_text()
    assert "10.7937/TCIA.2020.NNC20461" in text and "10.7937/TCIA.BBAG-2923" in text


def test_pixel_w1_and_heldout_images():
    from ctflow.training.evaluate import heldout_images, pixel_w1
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert pixel_w1(x, x + 0.1) == pytest.approx(0.1, abs=1e-6)
    assert pixel_w1(x, x.flip(0)) == pytest.approx(0.0, abs=1e-12)  # same values, reordered
    try:
        ref = heldout_images(64, (-1024.0, 1024.0), split="test")
    except FileNotFoundError:
        pytest.skip("bundled held-out DICOM sample not present")
    assert ref.shape == (10, 1, 64, 64)
    assert float(ref.min()) == 0.0 and float(ref.max()) <= 1.0
    # HU window: the body's soft tissue (~0 HU) sits near 0.5
    assert 0.1 < float(ref.mean()) < 0.6


@bundled
def test_samples_match_heldout_intensities_better_than_phantoms():
    """Acceptance check in miniature (docs/prior.md has the full 64-sample numbers): the
    pixel-histogram W1 distance to the held-out test slices is far below that of ellipses."""
    from ctflow.data import EllipsesDataset
    from ctflow.training.evaluate import heldout_images, pixel_w1
    try:
        ref = heldout_images(64, (-1024.0, 1024.0), split="test")
    except FileNotFoundError:
        pytest.skip("bundled held-out DICOM sample not present")
    prior = P.load_prior(NAME)
    x = prior.sample(16, steps=3, method="euler",
                     generator=torch.Generator().manual_seed(0)).clamp(0, 1)
    ell = torch.stack([EllipsesDataset(64, seed=0)[i] for i in range(16)])
    w_prior, w_ell = pixel_w1(x, ref), pixel_w1(ell, ref)
    assert w_prior < 0.5 * w_ell, (w_prior, w_ell)
