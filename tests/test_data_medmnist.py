"""MedMNIST reader on generated .npz files (no network)."""
import sys

import numpy as np
import pytest
import torch

from ctflow.data import MedMNIST


def make_npz(path, size, n=(5, 2, 3), channels=None, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size) + ((channels,) if channels else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (k, 1))
    np.savez(path, **arrays)
    return arrays


def test_reads_sized_file(tmp_path):
    arr = make_npz(tmp_path / "organcmnist_64.npz", 64)
    ds = MedMNIST("OrganCMNIST", "val", size=64, root=tmp_path)
    assert len(ds) == 2 and ds.channels == 1
    x = ds[1]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0].numpy(), arr["val_images"][1] / 255.0, rtol=1e-6)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    img, label = MedMNIST("organcmnist", "test", size=64, root=tmp_path, return_label=True)[2]
    assert int(label[0]) == int(arr["test_labels"][2, 0])
    assert len(MedMNIST("organcmnist", "validation", size=64, root=tmp_path)) == 2


def test_reads_28_from_plain_name_and_rgb(tmp_path):
    make_npz(tmp_path / "organamnist.npz", 28)
    assert MedMNIST("organamnist", "train", size=28, root=tmp_path)[0].shape == (1, 28, 28)
    make_npz(tmp_path / "pathmnist_28.npz", 28, channels=3)
    assert MedMNIST("pathmnist", size=28, root=tmp_path)[0].shape == (3, 28, 28)


def test_errors(tmp_path, monkeypatch):
    make_npz(tmp_path / "organsmnist_128.npz", 64)  # wrong size inside
    with pytest.raises(ValueError, match="64x64.*size=128"):
        MedMNIST("organsmnist", size=128, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="organsmnist_224.npz"):
        MedMNIST("organsmnist", size=224, root=tmp_path)
    with pytest.raises(ValueError, match="size"):
        MedMNIST("organsmnist", size=100, root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        MedMNIST("organsmnist", "dev", size=128, root=tmp_path)
    np.savez(tmp_path / "organamnist_64.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="train_images"):
        MedMNIST("organamnist", size=64, root=tmp_path)
    # download=True without the optional package: a clear ImportError, no network.
    monkeypatch.setitem(sys.modules, "medmnist", None)
    with pytest.raises(ImportError, match="pip install"):
        MedMNIST("organcmnist", size=64, root=tmp_path / "none", download=True)
