"""DICOM reading and writing (ctflow.data.dicom, ctflow.data.dicom_write), bundled samples, split.

Synthetic series are generated in tmp_path; the real files are the bundled samples.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom import config as dcm_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGLosslessSV1, MRImageStorage, RLELossless,
                         generate_uid)

import ctflow.data as cd
from ctflow.data import DicomError, read_dicom_series, read_dicom_slices


# ---------------------------------------------------------------------- synthetic files
def make_slice(path, *, k, series_uid, study_uid, instance=None, z0=10.0, dz=2.5, rows=6,
               cols=7, modality="CT", slope=1.0, intercept=-1024.0, pixel_data=True,
               orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), spacing=(0.7, 0.9),
               implicit=False, patient="P001"):
    """Write slice ``k`` of a synthetic series; stored value = 100·k + 10·row + col + 1000.

    Its ImagePositionPatient is ``origin + (z0 + k·dz)·n`` with ``n`` the slice normal, so the
    true order is ``k``. Returns the HU the reader must produce.
    """
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    pos = np.array([-20.0, -30.0, 0.0]) + (z0 + k * dz) * n
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDescription = "synthetic"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
    ds.InstanceNumber = int(k + 1 if instance is None else instance)
    ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.PixelSpacing = [f"{v}" for v in spacing]
    ds.SliceThickness = f"{dz}"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
    stored = (1000 + 100 * k + 10 * np.arange(rows)[:, None] + np.arange(cols)[None]).astype("<u2")
    if pixel_data:
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return stored.astype(np.float64) * slope + intercept


def make_series(folder, n=5, *, names=None, instances=None, study_uid=None, series_uid=None,
                zs=None, **kw):
    """Write ``n`` slices; returns (expected HU stacked in true order, list of paths)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    hu, paths = [], []
    for k in range(n):
        name = names[k] if names else f"s{k:03d}.dcm"
        inst = instances[k] if instances else None
        extra = dict(kw)
        if zs is not None:
            extra.update(z0=zs[k], dz=0.0)
        hu.append(make_slice(folder / name, k=k, series_uid=series_uid, study_uid=study_uid,
                             instance=inst, **extra))
        paths.append(folder / name)
    return np.stack(hu), paths


@pytest.fixture
def strict_pydicom():
    """Make pydicom raise on any invalid element value while reading/writing."""
    old_r = dcm_config.settings.reading_validation_mode
    old_w = dcm_config.settings.writing_validation_mode
    dcm_config.settings.reading_validation_mode = dcm_config.RAISE
    dcm_config.settings.writing_validation_mode = dcm_config.RAISE
    yield
    dcm_config.settings.reading_validation_mode = old_r
    dcm_config.settings.writing_validation_mode = old_w


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---------------------------------------------------------------------- bundled real data
def test_chest_subset_reads_in_anatomical_order():
    files = cd.sample_files("chest-subset")
    vol = read_dicom_series(cd.sample_path("chest-subset"))
    assert vol.shape == (6, 512, 512) and vol.hu.dtype == np.float32
    z = vol.positions[:, 2]
    assert np.all(np.diff(z) > 0)
    np.testing.assert_allclose(np.diff(z), 5.0)
    np.testing.assert_allclose(vol.spacing, (5.0, 0.841796875, 0.841796875))
    # Order checked against each file's own ImagePositionPatient (not names/InstanceNumber).
    ipp = {f.name: [float(v) for v in pydicom.dcmread(f, stop_before_pixels=True)
                    .ImagePositionPatient] for f in files}
    for m, p in zip(vol.slices, vol.positions):
        np.testing.assert_allclose(ipp[m.file_name], p)
    assert [m.file_name for m in vol.slices] == [f"1-{i}.dcm" for i in range(35, 29, -1)]
    assert [m.instance_number for m in vol.slices] == list(range(35, 29, -1))
    # HU = stored - 1024, checked on one slice with pydicom's raw pixels.
    raw = pydicom.dcmread(files[0])
    assert float(raw.RescaleIntercept) == -1024.0 and float(raw.RescaleSlope) == 1.0
    k = [m.file_name for m in vol.slices].index(files[0].name)
    np.testing.assert_array_equal(vol.hu[k], raw.pixel_array.astype(np.float32) - 1024.0)
    assert vol.hu.min() >= -1024 and vol.hu.max() <= 3071
    assert vol.modality == "CT" and vol.series_uid.startswith("1.3.6.1.4.1.14519")
    np.testing.assert_allclose(vol.normal, [0, 0, 1])


def test_jpeg2000_samples_decode():
    files = cd.sample_files("totalseg-j2k")
    assert len(files) == 3
    vol = read_dicom_series(cd.sample_path("totalseg-j2k"))
    assert vol.shape == (3, 512, 512)
    assert all(m.transfer_syntax == JPEG2000Lossless for m in vol.slices)
    assert vol.hu.min() >= -1024 and vol.hu.max() <= 3071
    np.testing.assert_allclose(np.diff(vol.slice_locations), 2.0)
    np.testing.assert_allclose(vol.spacing[1:], (0.9765625, 0.9765625))
    # Lossless decode agrees with the encoder's recorded extremes of the stored values.
    for m, img in zip(vol.slices, vol.hu):
        hdr = pydicom.dcmread(m.path, stop_before_pixels=True)
        stored = img - float(hdr.RescaleIntercept)
        assert stored.min() == hdr.SmallestImagePixelValue
        assert stored.max() == hdr.LargestImagePixelValue
    # Blank Series/SOP UIDs in these anonymised files: grouped together, SOP from file meta.
    assert vol.series_uid == ""
    assert all(m.sop_instance_uid and m.sop_instance_uid in m.file_name for m in vol.slices)


def test_heldout_slices_follow_the_split():
    test, val = cd.heldout_slices("test"), cd.heldout_slices("validation")
    assert len(test) == 10 and len(val) == 4
    assert sorted({s.meta.patient_id for s in test}) == sorted(cd.TEST_PATIENTS)
    assert sorted({s.meta.patient_id for s in val}) == sorted(cd.VALIDATION_PATIENTS)
    for s in test + val:
        assert s.hu.shape == (512, 512) and s.hu.dtype == np.float32
        assert s.hu.min() >= -1024 and s.hu.max() <= 3071
        assert s.meta.file_name.startswith(s.meta.patient_id + "_")
    raw = read_dicom_slices(cd.heldout_files("test"))
    assert {float(s.hu.min()) for s in raw} == {-3024.0, -2048.0, -1024.0}  # padding values
    with pytest.raises(ValueError, match="test.*validation"):
        cd.heldout_files("train")


def test_split_is_by_patient_and_split_files(tmp_path):
    parts = {name: cd.split_parts(name) for name in cd.SPLIT_NAMES}
    patients = {name: {p.patient for p in ps} for name, ps in parts.items()}
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["validation"]
    assert not patients["test"] & patients["validation"]
    assert sum(p.n_slices for p in parts["test"]) == 10
    assert sum(p.n_slices for p in parts["validation"]) == 4
    assert cd.split_of_patient("A058062") == "test"
    assert cd.split_of_patient("A048383") == "validation"
    assert cd.split_of_patient("Lung_Dx-A0001") == "train"
    with pytest.raises(ValueError, match="no split"):
        cd.split_of_patient("nobody")
    # split_files on a fake tree: files of other patients are never listed.
    covid = tmp_path / "covid19-ny-sbu-slices"
    covid.mkdir()
    for p in cd.TEST_PATIENTS + cd.VALIDATION_PATIENTS + cd.TRAIN_COVID_PATIENTS:
        for s in ("a", "b"):
            (covid / f"{p}_{s}.dcm").write_bytes(b"x")
    got = cd.split_files("test", tmp_path)
    assert [len(f) for _, f in got] == [2] * 5
    assert all(f.name.split("_")[0] in cd.TEST_PATIENTS for _, fs in got for f in fs)
    with pytest.raises(FileNotFoundError, match="lung-pet-ct-dx-a0001"):
        cd.split_files("train", tmp_path)
    assert len(cd.split_files("train", tmp_path, strict=False)) == 10


# ---------------------------------------------------------------------- synthetic reading
def test_order_is_by_position_not_names_or_instance_numbers(tmp_path):
    names = [f"{random.Random(k).randrange(10**6):06d}.dcm" for k in range(6)]
    # Names sort in a scrambled order, instance numbers run against the position.
    hu, paths = make_series(tmp_path / "s", 6, names=names, instances=[6, 5, 4, 3, 2, 1])
    vol = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))
    assert np.all(np.diff(vol.positions[:, 2]) > 0)
    assert vol.spacing == (2.5, 0.7, 0.9)
    # The same from a shuffled explicit list of files.
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)
    vol2 = read_dicom_series(shuffled)
    np.testing.assert_array_equal(vol2.hu, vol.hu)


def test_oblique_orientation_sorts_along_the_normal(tmp_path):
    # Coronal slices: r = (1,0,0), c = (0,0,-1), n = r x c = (0,1,0); z plays no role.
    hu, _ = make_series(tmp_path / "c", 4, orientation=(1, 0, 0, 0, 0, -1),
                        instances=[2, 4, 1, 3], names=["d", "c", "b", "a"])
    vol = read_dicom_series(tmp_path / "c")
    np.testing.assert_allclose(vol.normal, [0, 1, 0])
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))
    assert np.all(np.diff(vol.positions[:, 1]) > 0)


def test_rescale_slope_intercept_and_implicit_vr(tmp_path):
    hu, _ = make_series(tmp_path / "r", 3, slope=2.0, intercept=-1000.0, implicit=True)
    vol = read_dicom_series(tmp_path / "r")
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))
    assert vol.hu[0, 0, 0] == 2 * 1000 - 1000
    assert vol.slices[0].slope == 2.0 and vol.slices[0].intercept == -1000.0


def test_read_slices_from_different_patients(tmp_path):
    a = make_slice(tmp_path / "a.dcm", k=0, series_uid=generate_uid(), study_uid=generate_uid(),
                   patient="PA", rows=4, cols=5)
    b = make_slice(tmp_path / "b.dcm", k=3, series_uid=generate_uid(), study_uid=generate_uid(),
                   patient="PB", rows=6, cols=3, intercept=0.0)
    out = read_dicom_slices([tmp_path / "b.dcm", tmp_path / "a.dcm"], clip=(-1024, 3071))
    assert [s.meta.patient_id for s in out] == ["PB", "PA"]
    np.testing.assert_array_equal(out[0].hu, np.clip(b, -1024, 3071))
    np.testing.assert_array_equal(out[1].hu, a)
    hu, meta = out[1]
    assert meta.file_name == "a.dcm" and hu.shape == (4, 5)


def test_two_series_error_lists_them_and_series_uid_selects(tmp_path):
    s1, s2 = generate_uid(), generate_uid()
    hu1, _ = make_series(tmp_path, 3, series_uid=s1, names=["a1", "a2", "a3"])
    make_series(tmp_path / "sub", 2, series_uid=s2, names=["b1", "b2"])
    with pytest.raises(DicomError, match="2 series") as err:
        read_dicom_series(tmp_path)
    assert s1 in str(err.value) and s2 in str(err.value) and "series_uid" in str(err.value)
    vol = read_dicom_series(tmp_path, series_uid=s1)
    np.testing.assert_array_equal(vol.hu, hu1.astype(np.float32))
    with pytest.raises(DicomError, match="not found"):
        read_dicom_series(tmp_path, series_uid="1.2.3")


def test_non_dicom_sidecar_files_in_a_folder_are_skipped(tmp_path):
    hu, _ = make_series(tmp_path, 3)
    (tmp_path / "PROVENANCE.md").write_text("# notes\n")
    (tmp_path / "LICENSE.txt").write_text("licence\n")
    (tmp_path / ".hidden").write_text("x")
    vol = read_dicom_series(tmp_path)
    assert vol.shape == (3, 6, 7)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_series_decode_like_their_uncompressed_copies(tmp_path, syntax):
    hu, paths = make_series(tmp_path / "raw", 3, rows=64, cols=64)  # J2K needs >= 32 px
    (tmp_path / "enc").mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)
        ds.save_as(tmp_path / "enc" / p.name, enforce_file_format=True)
    vol = read_dicom_series(tmp_path / "enc")
    assert all(m.transfer_syntax == syntax for m in vol.slices)
    np.testing.assert_array_equal(vol.hu, read_dicom_series(tmp_path / "raw").hu)
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))


def test_undecodable_jpeg_lossless_names_file_and_cause(tmp_path):
    _, paths = make_series(tmp_path, 1)
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0], enforce_file_format=True)
    # Either no JPEG Lossless decoder is installed (the message says what to install) or
    # the decoder rejects the corrupt codestream; both name the file.
    with pytest.raises(DicomError, match="JPEG Lossless") as err:
        read_dicom_series(tmp_path)
    msg = str(err.value)
    assert str(paths[0]) in msg
    assert "pylibjpeg-libjpeg" in msg or "corrupt" in msg


# ---------------------------------------------------------------------- bad input corpus (read)
def test_bad_non_dicom_file(tmp_path):
    make_series(tmp_path, 3)
    bad = tmp_path / "junk.dcm"
    bad.write_text("this is not DICOM at all\n" * 20)
    with pytest.raises(DicomError, match="not a DICOM file") as err:
        read_dicom_series(tmp_path)
    assert str(bad) in str(err.value)
    with pytest.raises(DicomError, match="junk.dcm"):
        read_dicom_slices([bad])


@pytest.mark.parametrize("keep", [0.12, 0.3, 0.5, 0.97])
def test_bad_truncated_file(tmp_path, keep):
    _, paths = make_series(tmp_path, 3, rows=32, cols=32)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DicomError, match="truncated") as err:
        read_dicom_series(tmp_path)
    assert str(paths[1]) in str(err.value)


def test_bad_file_without_pixel_data(tmp_path):
    study, series = generate_uid(), generate_uid()
    make_series(tmp_path, 2, study_uid=study, series_uid=series)
    make_slice(tmp_path / "nopix.dcm", k=2, study_uid=study, series_uid=series,
               pixel_data=False)
    with pytest.raises(DicomError, match="no PixelData") as err:
        read_dicom_series(tmp_path)
    assert "nopix.dcm" in str(err.value)


def test_bad_mr_file(tmp_path):
    _, paths = make_series(tmp_path, 3, modality="MR", intercept=0.0)
    with pytest.raises(DicomError, match="Modality is MR, not CT") as err:
        read_dicom_series(tmp_path)
    assert any(str(p) in str(err.value) for p in paths)
    with pytest.raises(DicomError, match="Modality is MR"):
        read_dicom_slices(paths[:1])
    vol = read_dicom_series(tmp_path, allow_non_ct=True)
    assert vol.modality == "MR" and vol.shape == (3, 6, 7)


def test_bad_inconsistent_slice_spacing(tmp_path):
    _, paths = make_series(tmp_path, 5, zs=[0.0, 2.0, 4.0, 8.0, 10.0])  # one slice missing
    with pytest.raises(DicomError, match="inconsistent slice spacing") as err:
        read_dicom_series(tmp_path)
    assert str(paths[2]) in str(err.value) and str(paths[3]) in str(err.value)


def test_bad_duplicate_positions(tmp_path):
    make_series(tmp_path, 3, zs=[0.0, 2.0, 2.0])
    with pytest.raises(DicomError, match="same position"):
        read_dicom_series(tmp_path)


def test_bad_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="empty folder") as err:
        read_dicom_series(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "README.md").write_text("x")
    with pytest.raises(DicomError, match="empty folder"):
        read_dicom_series(tmp_path / "only_notes")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dicom_series(tmp_path / "nowhere")
    with pytest.raises(DicomError, match="empty list"):
        read_dicom_series([])


def test_mismatched_matrix_and_orientation(tmp_path):
    study, series = generate_uid(), generate_uid()
    make_series(tmp_path / "m", 2, study_uid=study, series_uid=series)
    make_slice(tmp_path / "m" / "odd.dcm", k=2, study_uid=study, series_uid=series, rows=5)
    with pytest.raises(DicomError, match="odd.dcm: matrix"):
        read_dicom_series(tmp_path / "m")
    make_series(tmp_path / "o", 2, study_uid=study, series_uid=series)
    make_slice(tmp_path / "o" / "tilt.dcm", k=2, study_uid=study, series_uid=series,
               orientation=(1, 0, 0, 0, 0.6, 0.8))
    with pytest.raises(DicomError, match="tilt.dcm: ImageOrientationPatient"):
        read_dicom_series(tmp_path / "o")


# ---------------------------------------------------------------------- writing
def _copy_chest(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(cd.sample_path("chest-subset"), src)
    return src


def test_round_trip_chest_subset(tmp_path, strict_pydicom):
    src = _copy_chest(tmp_path)
    vol = read_dicom_series(src)
    before = listing(src)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    recon = vol.hu + rng.uniform(-0.45, 0.45, vol.hu.shape).astype(np.float32)
    paths = cd.write_dicom_series(torch.from_numpy(recon), vol, out,
                                  description="ctflow fbp 60 views sigma=0.01")
    assert listing(src) == before  # input untouched
    assert len(paths) == 6 and sorted(paths) == sorted(out.iterdir())
    back = read_dicom_series(out)
    assert np.max(np.abs(back.hu - recon)) <= 0.5 + 1e-4  # rescale quantisation (slope 1)
    np.testing.assert_array_equal(back.hu, np.round(recon))
    np.testing.assert_allclose(back.positions, vol.positions, atol=1e-4)
    np.testing.assert_allclose(back.orientation, vol.orientation)
    np.testing.assert_allclose(back.spacing, vol.spacing)
    # UIDs: a new series in the same study, new and unique SOP instances.
    assert back.series_uid != vol.series_uid and back.study_uid == vol.study_uid
    new_sops = [m.sop_instance_uid for m in back.slices]
    old_sops = [m.sop_instance_uid for m in vol.slices]
    assert len(set(new_sops)) == 6 and not set(new_sops) & set(old_sops)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)  # an independent reader, in strict validation mode
        for el in ds.iterall():
            el.value  # noqa: B018 - decode every element
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]  # value 3 is required
        assert ds.SeriesDescription == "ctflow fbp 60 views sigma=0.01"
        assert ds.Modality == "CT" and ds.SOPClassUID == CTImageStorage
        assert ds.FrameOfReferenceUID == vol.datasets[k].FrameOfReferenceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == old_sops[k]
        assert ds.pixel_array.dtype == np.int16
        assert p.name == cd.derived_file_name(ds.SOPInstanceUID, ds.InstanceNumber)
        assert old_sops[k] not in p.name      # never named after the source
        assert ds.InstanceNumber == vol.slices[k].instance_number   # the source's order
        assert not any(tag.is_private for tag in ds.keys())


def test_round_trip_wide_range_and_resized(tmp_path):
    src = tmp_path / "in"
    _, _ = make_series(src, 3, rows=8, cols=10, spacing=(0.5, 0.6))
    vol = read_dicom_series(src)
    wide = np.linspace(-5000.0, 40000.0, vol.hu.size).reshape(vol.hu.shape)
    cd.write_dicom_series(wide, vol, tmp_path / "wide", description="wide range")
    back = read_dicom_series(tmp_path / "wide")
    assert np.max(np.abs(back.hu - wide)) <= 0.5 + 1e-3 * 1  # intercept shifted, slope 1
    # A different in-plane matrix keeps the field of view.
    small = np.zeros((3, 4, 5))
    cd.write_dicom_series(small, vol, tmp_path / "small", description="half size")
    s = read_dicom_series(tmp_path / "small")
    assert s.shape == (3, 4, 5)
    np.testing.assert_allclose(s.spacing[1:], (1.0, 1.2))
    np.testing.assert_allclose(np.array(s.shape[1:]) * s.spacing[1:],
                               np.array(vol.shape[1:]) * vol.spacing[1:])
    edge_old = vol.positions - 0.5 * vol.spacing[2] * vol.row_direction \
        - 0.5 * vol.spacing[1] * vol.column_direction
    edge_new = s.positions - 0.5 * s.spacing[2] * s.row_direction \
        - 0.5 * s.spacing[1] * s.column_direction
    np.testing.assert_allclose(edge_new, edge_old, atol=1e-6)


def test_choose_rescale():
    assert cd.choose_rescale(-3024, 3071) == (1.0, 0.0)
    slope, icpt = cd.choose_rescale(-1000, 50000)
    assert slope == 1.0 and -32768 <= round(-1000 - icpt) and round(50000 - icpt) <= 32767
    slope, icpt = cd.choose_rescale(-1e5, 1e5)
    assert slope > 1 and abs(round((1e5 - icpt) / slope)) <= 32768
    with pytest.raises(ValueError):
        cd.choose_rescale(np.nan, 0)


def test_write_refuses_input_folder_and_inside_it(tmp_path):
    src = tmp_path / "in"
    make_series(src, 3)
    vol = read_dicom_series(src)
    before = listing(src)
    with pytest.raises(DicomError, match="is the input folder") as err:
        cd.write_dicom_series(vol.hu, vol, src, description="x")
    assert str(src) in str(err.value)
    with pytest.raises(DicomError, match="inside the input folder"):
        cd.write_dicom_series(vol.hu, vol, src / "recon", description="x")
    with pytest.raises(DicomError, match="input folder"):
        cd.write_dicom_slice(vol.hu[0], vol, 0, src, description="x")
    assert listing(src) == before


def test_write_refuses_existing_file_before_writing_anything(tmp_path):
    src = tmp_path / "in"
    make_series(src, 4)
    vol = read_dicom_series(src)
    out = tmp_path / "out"
    out.mkdir()
    uid = "1.2.3.4"
    clash = out / cd.derived_output_name(vol, 2, uid)
    clash.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists") as err:
        cd.write_dicom_series(vol.hu, vol, out, description="x", series_uid=uid)
    assert str(clash) in str(err.value)
    assert listing(out) == [clash.name] and clash.read_bytes() == b"precious"


def test_write_bad_volume_writes_nothing(tmp_path):
    src = tmp_path / "in"
    make_series(src, 3)
    vol = read_dicom_series(src)
    with pytest.raises(ValueError, match=r"shape \(3, Y, X\)"):
        cd.write_dicom_series(vol.hu[:2], vol, tmp_path / "o1", description="x")
    bad = vol.hu.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        cd.write_dicom_series(bad, vol, tmp_path / "o2", description="x")
    with pytest.raises(ValueError, match="description"):
        cd.write_dicom_series(vol.hu, vol, tmp_path / "o3", description="  ")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_write_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    src = tmp_path / "in"
    make_series(src, 4)
    vol = read_dicom_series(src)
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def failing_replace(a, b):
        calls.append(b)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cd.write_dicom_series(vol.hu, vol, out, description="x")
    assert len(calls) == 3 and not out.exists()  # two written files and the temp removed


def test_write_slice_by_slice_resumes_into_one_series(tmp_path, strict_pydicom):
    src = _copy_chest(tmp_path)
    vol = read_dicom_series(src)
    out = tmp_path / "out"
    desc = "ctflow msflow K=4 M=2 seed=0"
    uid = cd.derived_series_uid(vol, desc)
    assert uid == cd.derived_series_uid(vol, desc) != cd.derived_series_uid(vol, desc + "!")
    first = [cd.write_dicom_slice(vol.hu[k], vol, k, out, description=desc) for k in (0, 1)]
    # A second run skips what is written (by file name) and writes the rest.
    done = {p.name for p in out.iterdir()}
    todo = [k for k in range(len(vol)) if cd.derived_output_name(vol, k, uid) not in done]
    assert todo == [2, 3, 4, 5]
    with pytest.raises(FileExistsError):
        cd.write_dicom_slice(vol.hu[0], vol, 0, out, description=desc)
    rest = [cd.write_dicom_slice(vol.hu[k], vol, k, out, description=desc) for k in todo]
    back = read_dicom_series(out)  # a single series: one SeriesInstanceUID across both runs
    assert back.series_uid == uid and len(back) == 6
    np.testing.assert_array_equal(back.hu, vol.hu)
    np.testing.assert_allclose(back.positions, vol.positions, atol=1e-4)
    assert [p.name for p in first + rest] == [
        cd.derived_output_name(vol, k, uid) for k in range(len(vol))]
    assert [m.instance_number for m in back.slices] == [m.instance_number for m in vol.slices]
    with pytest.raises(ValueError, match="2-D"):
        cd.write_dicom_slice(vol.hu[:2], vol, 0, tmp_path / "o", description=desc)
    with pytest.raises(IndexError):
        cd.write_dicom_slice(vol.hu[0], vol, 6, tmp_path / "o", description=desc)


def test_write_from_compressed_reference_with_blank_uids(tmp_path, strict_pydicom):
    vol = read_dicom_series(cd.sample_path("totalseg-j2k"))
    paths = cd.write_dicom_series(vol.hu, vol, tmp_path / "out", description="copy")
    back = read_dicom_series(tmp_path / "out")
    np.testing.assert_array_equal(back.hu, vol.hu)
    assert back.series_uid and back.study_uid  # blank in the source, filled in the output
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 3


def test_clip_and_window_helpers():
    x = np.array([-3024.0, -1024.0, 0.0, 3071.0, 5000.0])
    np.testing.assert_array_equal(cd.clip_hu(x), [-1024, -1024, 0, 3071, 3071])
    w = cd.window_hu(torch.tensor(x))
    assert isinstance(w, torch.Tensor) and float(w.min()) == 0.0 and float(w.max()) == 1.0
    np.testing.assert_allclose(cd.unwindow_hu(cd.window_hu(x[1:4])), x[1:4])
    with pytest.raises(ValueError):
        cd.clip_hu(x, 10, 0)
