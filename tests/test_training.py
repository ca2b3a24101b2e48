"""Flow-matching training: loss decrease, exact resume, OT coupling, EMA, datasets, CLI."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctflow.training.datasets import CTSliceDataset, DicomSliceDataset, ellipses_dataset, hu_to_unit
from ctflow.cli import main
from ctflow.training.loop import EMA, latest_checkpoint, lr_at
from ctflow.training.prior import flow_matching_loss, ot_couple, train_prior

TINY = dict(base=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=2, image_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared CPU) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ellipses16():
    return ellipses_dataset(16, image_size=16, seed=3)


def test_loss_decreases_on_tiny_dataset(ellipses16, tmp_path):
    res = train_prior(ellipses16, out_dir=tmp_path, steps=60, batch_size=16, lr=3e-3,
                      model_config=TINY, warmup_steps=5, coupling="independent",
                      seed=0, checkpoint_every=1000, log_every=5, ema_decay=0.9)
    losses = [r["loss"] for r in res.losses]
    assert len(losses) == 12 and res.step == 60
    # flow matching starts near E|x1 - x0|^2 ~ 1.4 for images in [-1, 1]; it must fall clearly
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    assert res.prior.image_size == 16 and not res.prior.velocity.training
    assert (tmp_path / "ckpt-00000060.json").is_file()


def test_resume_is_exact(ellipses16, tmp_path):
    kw = dict(batch_size=8, lr=1e-3, model_config=TINY, warmup_steps=4, coupling="ot",
              seed=7, checkpoint_every=5, log_every=1, ema_decay=0.9)
    a = train_prior(ellipses16, out_dir=tmp_path / "a", steps=20, **kw)
    b1 = train_prior(ellipses16, out_dir=tmp_path / "b", steps=10, **kw)
    assert b1.step == 10
    b = train_prior(ellipses16, out_dir=tmp_path / "b", steps=20, **kw)
    assert b.step == 20
    sa, sb = a.prior.velocity.state_dict(), b.prior.velocity.state_dict()  # EMA weights
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in a.losses] == [r["loss"] for r in b.losses]
    # the raw weights, optimizer moments and RNG states in the checkpoints agree too
    from ctflow.priors.checkpoint import read_checkpoint
    ta, ma = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    tb, mb = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma["step"] == mb["step"] == 20
    # a different architecture in the same run directory is refused
    with pytest.raises(ValueError, match="differs"):
        train_prior(ellipses16, out_dir=tmp_path / "b", steps=25,
                    **{**kw, "model_config": dict(TINY, base=4)})


def test_resume_skips_corrupt_newest_checkpoint(ellipses16, tmp_path):
    kw = dict(batch_size=4, model_config=TINY, seed=1, checkpoint_every=3, log_every=1)
    train_prior(ellipses16, out_dir=tmp_path, steps=6, **kw)
    w = tmp_path / "ckpt-00000006.safetensors"
    w.write_bytes(w.read_bytes()[:-10])  # killed mid-write
    assert latest_checkpoint(tmp_path).name == "ckpt-00000003.json"
    res = train_prior(ellipses16, out_dir=tmp_path, steps=6, **kw)
    assert res.step == 6
    assert [r["step"] for r in res.losses] == [1, 2, 3, 4, 5, 6]


def test_ot_coupling_is_optimal_assignment():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 3, 3, generator=g)
    x1 = torch.randn(5, 1, 3, 3, generator=g)
    y = ot_couple(x0, x1)
    # a permutation of the noise batch
    assert sorted(y.flatten().tolist()) == sorted(x0.flatten().tolist())

    def cost(p):
        return float(sum(((x0[p[i]] - x1[i]) ** 2).sum() for i in range(5)))

    best = min(cost(p) for p in itertools.permutations(range(5)))
    assert float(((y - x1) ** 2).sum()) == pytest.approx(best, rel=1e-6)


def test_flow_matching_loss_is_zero_for_exact_velocity():
    x1 = torch.randn(4, 1, 2, 2)
    x0 = torch.randn(4, 1, 2, 2)
    t = torch.rand(4)
    # the conditional velocity x1 - x0 is recovered from x_t only if we know the pair
    loss = flow_matching_loss(lambda x, s: x1 - x0, x1, x0, t)
    assert float(loss) == 0.0
    loss0 = flow_matching_loss(lambda x, s: torch.zeros_like(x), x1, x0, t)
    assert float(loss0) == pytest.approx(float(((x1 - x0) ** 2).mean()))


def test_ema_update_rule():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9, warmup=True)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, step=0)  # d = min(0.9, 1/10) = 0.1
    assert float(ema.shadow["weight"]) == pytest.approx(0.9)
    ema.update(m, step=1000)  # d = 0.9
    assert float(ema.shadow["weight"]) == pytest.approx(0.9 * 0.9 + 0.1)
    with pytest.raises(ValueError):
        EMA(m, decay=1.0)


def test_lr_schedule():
    assert lr_at(0, lr=1.0, warmup_steps=4, total_steps=10) == 0.25
    assert lr_at(3, lr=1.0, warmup_steps=4, total_steps=10) == 1.0
    assert lr_at(9, lr=1.0, warmup_steps=4, total_steps=10) == 1.0
    assert lr_at(4, lr=1.0, warmup_steps=4, total_steps=10, schedule="cosine") == 1.0
    assert lr_at(10, lr=1.0, warmup_steps=4, total_steps=10, schedule="cosine",
                 min_lr_ratio=0.1) == pytest.approx(0.1)


def test_ct_slice_dataset_window_and_augmentation():
    hu = np.full((40, 30), -3024.0, dtype=np.float32)  # padding value outside the scan circle
    hu[5:35, 5:25] = 0.0
    hu[10:20, 10:20] = 1024.0
    assert float(hu_to_unit(np.float32(-1024), (-1024, 1024))) == 0.0
    assert float(hu_to_unit(np.float32(0), (-1024, 1024))) == 0.5
    ds = CTSliceDataset([hu, hu.T], image_size=16, preload_size=32)
    assert len(ds) == 2 and ds[0].shape == (1, 16, 16)
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) <= 1.0
    b1 = ds.sample(8, torch.Generator().manual_seed(0))
    b2 = ds.sample(8, torch.Generator().manual_seed(0))
    assert b1.shape == (8, 1, 16, 16) and torch.equal(b1, b2)
    assert float(b1.min()) >= 0.0 and float(b1.max()) <= 1.0
    plain = CTSliceDataset([hu], image_size=16, augment=False)
    assert torch.equal(plain.sample(3, torch.Generator()), plain[0].expand(3, 1, 16, 16))
    with pytest.raises(ValueError, match="hu_window"):
        CTSliceDataset([hu], hu_window=(10, -10))
    with pytest.raises(ValueError, match="no slices"):
        CTSliceDataset([])


def test_dicom_dataset_excludes_patients():
    root = Path(__file__).resolve().parents[1] / "ctflow" / "data" / "samples" / "ct-heldout"
    if not root.is_dir():
        pytest.skip("bundled held-out DICOM sample not present")
    files = sorted(f for f in root.glob("*.dcm")
                   if f.name.startswith(("A048383", "A056642")))  # the validation patients
    assert len(files) == 4
    ds = DicomSliceDataset(files, image_size=16, exclude_patients=["A048383"])
    d = ds.describe()
    assert len(ds) == 2
    assert d["sources"][0]["excluded_patients"] == ["A048383"]
    assert "A048383" not in sum((s["patients"] for s in d["sources"]), [])
    with pytest.raises(FileNotFoundError):
        DicomSliceDataset([root / "nope.dcm"])


def test_cli_train_and_bundle(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "ellipses", "--count", "8", "--image-size", "16", "--steps", "3",
            "--base", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
            "--attention-levels", "1", "--batch-size", "4", "--out", str(run), "--name", "tiny",
            "--checkpoint-every", "2", "--log-every", "1"]
    assert main(argv) == 0
    meta = json.loads((run / "ckpt-00000003.json").read_text())
    assert meta["step"] == 3 and meta["commands"][0].startswith("ctflow train ellipses")
    assert main(["train", "bundle", str(run), "--name", "tiny", "--dest",
                 str(tmp_path / "p")]) == 0
    from ctflow.priors import load_prior
    prior = load_prior(tmp_path / "p")
    assert prior.name == "tiny" and prior.image_size == 16
    assert prior.config["training"]["steps"] == 3
    assert len(prior.config["training"]["loss_curve"]) == 3
    x = prior.sample(2, steps=2, method="euler")
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_medmnist_npz_dataset_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "organamnist.npz", train_images=imgs,
             train_labels=np.zeros((6, 1), dtype=np.int64))
    from ctflow.training.datasets import medmnist_dataset
    ds = medmnist_dataset("organamnist", split="train", size=28, root=tmp_path, image_size=16)
    assert len(ds) == 6 and ds[0].shape == (1, 16, 16)
    full = medmnist_dataset("organamnist", split="train", size=28, root=tmp_path)
    assert torch.allclose(full[2][0], torch.from_numpy(imgs[2] / 255.0).float())
    argv = ["train", "medmnist", str(tmp_path / "organamnist.npz"), "--image-size", "16",
            "--steps", "2", "--base", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
            "--attention-levels", "1", "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000002.json"
