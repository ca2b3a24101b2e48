"""LoDoPaB-CT layout reader and the atomic HDF5 result store, on generated files."""
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctflow.data import LoDoPaB, ResultStore


def make_lodopab(root, part="train", counts=(4, 4, 3), gt_shape=(5, 5), obs_shape=(7, 6)):
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for n, c in enumerate(counts):
        k = np.arange(start, start + c, dtype=np.float32)[:, None, None]
        with h5py.File(root / f"ground_truth_{part}_{n:03d}.hdf5", "w") as f:
            f["data"] = k + np.zeros(gt_shape, np.float32)
        with h5py.File(root / f"observation_{part}_{n:03d}.hdf5", "w") as f:
            f["data"] = -k + np.zeros(obs_shape, np.float32)
        start += c
    return start


def test_lodopab_pairs_and_indexing(tmp_path):
    total = make_lodopab(tmp_path)
    ds = LoDoPaB(tmp_path, "train", slices_per_file=4)
    assert len(ds) == total == 11
    for i in (0, 3, 4, 7, 8, 10):
        obs, gt = ds[i]
        assert gt.shape == (1, 5, 5) and obs.shape == (1, 7, 6) and gt.dtype == torch.float32
        assert float(gt[0, 0, 0]) == i and float(obs[0, 0, 0]) == -i  # slices in order, paired
    assert ds.locate(9) == (2, 1)
    with pytest.raises(IndexError):
        ds[11]
    obs, gt = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert gt.shape == (3, 1, 5, 5)
    only = LoDoPaB(tmp_path, "train", ground_truth_only=True, slices_per_file=4)
    assert float(only[5][0, 0, 0]) == 5
    ds.close()


def test_lodopab_errors(tmp_path):
    make_lodopab(tmp_path / "a")
    os.remove(tmp_path / "a" / "observation_train_001.hdf5")
    with pytest.raises(FileNotFoundError, match="observation_train_001.hdf5"):
        LoDoPaB(tmp_path / "a", "train", slices_per_file=4)
    assert len(LoDoPaB(tmp_path / "a", "train", ground_truth_only=True, slices_per_file=4)) == 11
    make_lodopab(tmp_path / "b", counts=(4, 2, 3))  # a short file in the middle
    with pytest.raises(ValueError, match="every file but the last"):
        LoDoPaB(tmp_path / "b", "train", slices_per_file=4)
    with pytest.raises(FileNotFoundError, match="ground_truth_test"):
        LoDoPaB(tmp_path / "b", "test", slices_per_file=4)
    with pytest.raises(ValueError, match="part"):
        LoDoPaB(tmp_path / "b", "dev")
    make_lodopab(tmp_path / "c", counts=(128, 5))
    assert len(LoDoPaB(tmp_path / "c", "train", ground_truth_only=True)) == 133  # default 128


def test_result_store_round_trip(tmp_path):
    store = ResultStore(tmp_path / "res.h5")
    assert store.names() == [] and store.attrs() == {}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.write("msflow/seed0/recon", torch.from_numpy(x),
                attrs={"psnr": 31.5, "method": "msflow", "config": {"K": 4, "rho": [1, 2]},
                       "none": None, "curve": np.array([1.0, 2.0])})
    store.write_many({"fbp/recon": x * 2, "fbp/sino": np.ones(5)},
                     attrs={"fbp/recon": {"psnr": 25.0}})
    store.set_attrs(seed=0, versions={"torch": torch.__version__})
    again = ResultStore(tmp_path / "res.h5")
    assert again.names() == ["fbp/recon", "fbp/sino", "msflow/seed0/recon"]
    np.testing.assert_array_equal(again.read("msflow/seed0/recon"), x)
    a = again.attrs("msflow/seed0/recon")
    assert a["psnr"] == 31.5 and a["method"] == "msflow" and a["config"] == {"K": 4, "rho": [1, 2]}
    assert a["none"] is None
    np.testing.assert_array_equal(a["curve"], [1.0, 2.0])
    assert again.attrs()["versions"] == {"torch": torch.__version__}
    assert "fbp/sino" in again and len(again) == 3
    with pytest.raises(FileExistsError, match="exists"):
        store.write("fbp/recon", x)
    store.write("fbp/recon", x * 3, overwrite=True)
    np.testing.assert_array_equal(store.read("fbp/recon"), x * 3)
    store.delete("fbp/sino")
    assert store.names() == ["fbp/recon", "msflow/seed0/recon"]
    with pytest.raises(KeyError):
        store.read("nope")
    with pytest.raises(ValueError, match="name"):
        store.write("../escape", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.h5"]  # no temporaries left


def test_result_store_failed_change_keeps_old_file(tmp_path):
    store = ResultStore(tmp_path / "res.h5")
    store.write("a", np.zeros(3))
    before = (tmp_path / "res.h5").read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        store.write("b", np.ones(3), attrs={"bad": object()})
    assert (tmp_path / "res.h5").read_bytes() == before
    assert store.names() == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["res.h5"]
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5"):
        ResultStore(tmp_path / "text.h5")
