"""The bundled latent CT prior ``ct128latent`` (autoencoder + latent flow, trained here on the
training patients only): it loads offline by name, is small, records its training, and its
autoencoder reproduces a held-out VALIDATION slice (bundled sample data, never trained on)."""
import json

import pytest
import torch

from ctflow.data.splits import TEST_PATIENTS, VALIDATION_PATIENTS
from ctflow.priors import LatentFlowPrior, list_priors, load_prior
from ctflow.priors.registry import bundled_dir

NAME = "ct128latent"
pytestmark = pytest.mark.skipif(NAME not in list_priors(), reason=f"{NAME} is not bundled")


@pytest.fixture(scope="module")
def prior():
    return load_prior(NAME)


def test_loads_by_name_with_the_documented_shapes(prior):
    assert isinstance(prior, LatentFlowPrior) and prior.is_latent
    assert prior.image_size == 128 and prior.channels == 1
    assert prior.latent_shape == (4, 32, 32)
    assert prior.hu_window == (-1024.0, 1024.0)
    size = sum(p.stat().st_size for p in bundled_dir().glob(f"{NAME}.*"))
    assert size < 30 * 2 ** 20


def test_records_training_on_training_patients_only():
    meta = json.loads((bundled_dir() / f"{NAME}.json").read_text())
    assert meta["kind"] == "latent"
    held_out = set(TEST_PATIENTS) | set(VALIDATION_PATIENTS)
    for part in ("autoencoder", "flow"):
        run = meta["training"][part]
        assert run["steps"] > 0 and run["wall_seconds"] > 0 and run["commands"]
        cmd = run["commands"][-1]
        assert "--exclude-patients" in cmd
        excluded = set(cmd.split("--exclude-patients ")[1].split()[0].split(","))
        assert held_out <= excluded, part
    for src in meta["data"]["sources"]:
        assert not set(src.get("patients", [])) & held_out


def test_autoencoder_reproduces_a_validation_slice(prior):
    from ctflow.data import samples
    from ctflow.training.datasets import CTSliceDataset
    from ctflow.metrics import psnr
    hu = samples.heldout_slices("validation")[0].hu
    x = CTSliceDataset([hu], image_size=128, hu_window=prior.hu_window, augment=False)[0][None]
    z = prior.encode(x)
    assert z.shape == (1, 4, 32, 32)
    assert 0.2 < float(z.std()) < 5.0          # normalised codes
    assert float(psnr(prior.decode(z).clamp(0, 1), x)) > 30.0


def test_samples_decode_to_plausible_images(prior):
    x = prior.sample(2, steps=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 128, 128) and bool(torch.isfinite(x).all())
    assert -0.2 < float(x.min()) and float(x.max()) < 1.3
    assert 0.02 < float(x.mean()) < 0.7


def test_reconstruct_api_and_reconstruct_dicom_cli(tmp_path, capsys):
    """Acceptance 4: the bundled latent prior through ``ctflow.reconstruct`` (by name) and
    ``ctflow reconstruct-dicom`` unchanged (tiny budgets: this checks the plumbing)."""
    import shutil
    from pathlib import Path

    from ctflow.cli import main
    from ctflow.operators import ParallelBeam2D, RayTransform
    from ctflow.solvers import reconstruct
    A = RayTransform(ParallelBeam2D(image_size=128, angles=12))
    y = A(torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0)))
    for method, opts in (("msflow", dict(K=2, M=1, sweeps=1, decoder_steps=2)),
                         ("dflow", dict(N=2, iterations=1, max_iter=2))):
        res = reconstruct(y, A, NAME, method=method, sigma=0.1, **opts)
        assert res.image.shape == (1, 1, 128, 128) and bool(torch.isfinite(res.image).all())
    chest = Path(__file__).resolve().parents[1] / "ctflow" / "data" / "samples" / "chest-subset"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy2(sorted(chest.glob("*.dcm"))[0], src)
    out = tmp_path / "out"
    rc = main(["--quiet", "reconstruct-dicom", str(src), str(out), "--prior", NAME,
               "--views", "12", "--option", "K=2", "--option", "M=1", "--option", "sweeps=1",
               "--option", "decoder_steps=2"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["size"] == 128 and len(list(out.glob("*.dcm"))) == 1
