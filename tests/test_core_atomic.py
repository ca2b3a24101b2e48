"""The one atomic writer (:mod:`ctflow.data.atomic`) and the writers built on it: the file mode
follows the umask (never the ``0600`` of a temporary file), and a failed write leaves no
temporary file and the old target as it was."""
from __future__ import annotations

import os
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest

import ctflow.data as cd
from ctflow.data import ResultStore, Volume, read_dicom_series, write_nifti
from ctflow.data.atomic import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def small_volume() -> Volume:
    rng = np.random.default_rng(0)
    return Volume(hu=rng.normal(0, 300, (3, 4, 5)).astype(np.float32), spacing=(2.0, 0.7, 0.6),
                  positions=[[-10.0, -20.0, 5.0 + 2.0 * k] for k in range(3)],
                  orientation=[1, 0, 0, 0, 1, 0])


def test_files_get_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask
    assert want in (0o644, 0o640)
    vol = read_dicom_series(cd.sample_path("chest-subset"))
    dicoms = cd.write_dicom_series(vol.hu, vol, tmp_path / "dcm", description="mode")
    assert dicoms and [mode(p) for p in dicoms] == [want] * len(dicoms)
    nii = write_nifti(small_volume(), tmp_path / "v.nii.gz")
    store = ResultStore(tmp_path / "r.h5")
    store.write("a", np.zeros(3))
    store.write("b", np.ones(2))        # a change rewrites the file: still the umask mode
    atomic_write_json(tmp_path / "s.json", {"a": 1})
    atomic_write_text(tmp_path / "t.txt", "x\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\0")
    for p in (nii, tmp_path / "r.h5", tmp_path / "s.json", tmp_path / "t.txt", tmp_path / "b.bin"):
        assert mode(p) == want, (p.name, oct(mode(p)))
    assert names(tmp_path) == ["b.bin", "dcm", "r.h5", "s.json", "t.txt", "v.nii.gz"]


def test_text_and_json_content(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "é\r\nz", encoding="latin-1")
    assert (tmp_path / "t.txt").read_bytes() == "é\r\nz".encode("latin-1")
    atomic_write_json(tmp_path / "j.json", {"x": np.float32(0.5), "n": np.int64(3)})
    assert (tmp_path / "j.json").read_text() == '{\n  "x": 0.5,\n  "n": 3\n}\n'
    with pytest.raises(TypeError, match="str"):
        atomic_write_text(tmp_path / "t.txt", b"bytes")
    assert (tmp_path / "t.txt").read_bytes() == "é\r\nz".encode("latin-1")


def test_failed_writer_leaves_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "t.json"
    atomic_write_json(target, {"old": True})
    before = target.read_bytes()

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_save(target, broken)
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()}, default=None)
    assert target.read_bytes() == before and names(tmp_path) == ["t.json"]


def test_failed_rename_leaves_old_target_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")

    def failing_replace(a, b):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and names(tmp_path) == ["t.txt"]


def test_no_overwrite_refuses_a_file_that_appeared(tmp_path):
    target = tmp_path / "t.bin"

    def appears(tmp):
        tmp.write_bytes(b"new")
        target.write_bytes(b"someone else's")

    with pytest.raises(FileExistsError, match="t.bin"):
        atomic_save(target, appears, overwrite=False)
    assert target.read_bytes() == b"someone else's" and names(tmp_path) == ["t.bin"]
    atomic_write_bytes(target, b"replaced")   # overwrite=True (the default) replaces
    assert target.read_bytes() == b"replaced"


def test_nifti_failure_keeps_old_file(tmp_path, monkeypatch):
    path = write_nifti(small_volume(), tmp_path / "v.nii")
    before = path.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("nibabel failed (simulated)")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        write_nifti(small_volume(), path, overwrite=True)
    assert path.read_bytes() == before and names(tmp_path) == ["v.nii"]


def test_hdf5_failure_keeps_old_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "r.h5")
    store.write("a", np.arange(3.0))
    before = (tmp_path / "r.h5").read_bytes()
    monkeypatch.setattr(shutil, "copyfile", lambda a, b: (_ for _ in ()).throw(OSError("copy")))
    with pytest.raises(OSError, match="copy"):
        store.write("b", np.ones(2))
    assert (tmp_path / "r.h5").read_bytes() == before and names(tmp_path) == ["r.h5"]
    monkeypatch.undo()
    assert store.names() == ["a"]


def test_dicom_file_appearing_while_writing_is_kept(tmp_path, monkeypatch):
    src = tmp_path / "in"
    shutil.copytree(cd.sample_path("chest-subset"), src)
    vol = read_dicom_series(src)
    out = tmp_path / "out"
    out.mkdir()
    second = out / cd.derived_output_name(vol, 1, "1.2.3.4")
    import ctflow.data.atomic as atomic
    real_mode = atomic._file_mode

    def racing_mode():          # called once per file, after it is written, before the rename
        if not second.exists() and len(os.listdir(out)) == 2:   # first file + second's temp
            second.write_bytes(b"someone else's")
        return real_mode()

    monkeypatch.setattr(atomic, "_file_mode", racing_mode)
    with pytest.raises(FileExistsError, match=second.name):
        cd.write_dicom_series(vol.hu, vol, out, description="race", series_uid="1.2.3.4")
    assert names(out) == [second.name] and second.read_bytes() == b"someone else's"
