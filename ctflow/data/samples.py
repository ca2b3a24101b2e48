"""Real CT files bundled with ctflow (package data under ``ctflow/data/samples/``).

=================  ==========================================================================
name               contents
=================  ==========================================================================
``ct-heldout``     the 14 COVID-19-NY-SBU slices of the test (10) and validation (4) patients
                   of :mod:`ctflow.data.splits` (single slices, not a volume)
``chest-subset``   6 consecutive slices (``1-30.dcm`` … ``1-35.dcm``, 5 mm apart) of the
                   Lung-PET-CT-Dx Lung_Dx-A0001 chest series (uncompressed)
``totalseg-j2k``   3 consecutive slices of the TotalSegmentator example series, JPEG 2000
                   lossless compressed
=================  ==========================================================================

Each folder holds its own PROVENANCE.md (source, citation, licence).
"""
from __future__ import annotations

from pathlib import Path

from ctflow.data.dicom import DicomSlice, list_dicom_files, read_dicom_slices
from ctflow.data.splits import TEST_PATIENTS, VALIDATION_PATIENTS
from ctflow.data.volume import HU_MAX, HU_MIN

__all__ = ["SAMPLE_NAMES", "sample_path", "sample_files", "heldout_files", "heldout_slices"]

SAMPLE_NAMES: tuple[str, ...] = ("ct-heldout", "chest-subset", "totalseg-j2k")
_ROOT = Path(__file__).resolve().parent / "samples"


def sample_path(name: str) -> Path:
    """The folder of the bundled sample ``name`` (one of :data:`SAMPLE_NAMES`)."""
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample {name!r}; bundled samples: {SAMPLE_NAMES}")
    path = _ROOT / name
    if not path.is_dir():
        raise FileNotFoundError(f"bundled sample folder missing: {path} (broken install?)")
    return path


def sample_files(name: str) -> list[Path]:
    """The DICOM files of the bundled sample ``name``, sorted by file name."""
    return list_dicom_files(sample_path(name))


def heldout_files(split: str = "test") -> list[Path]:
    """The bundled files of the ``"test"`` or ``"validation"`` patients, sorted by name."""
    if split == "test":
        patients = TEST_PATIENTS
    elif split == "validation":
        patients = VALIDATION_PATIENTS
    else:
        raise ValueError(f"heldout split must be 'test' or 'validation'; got {split!r}")
    files = [f for f in sample_files("ct-heldout") if f.name.split("_", 1)[0] in patients]
    expected = 2 * len(patients)
    if len(files) != expected:
        raise FileNotFoundError(f"{sample_path('ct-heldout')}: expected {expected} files for the "
                                f"{split} patients {patients}, found {len(files)}")
    return files


def heldout_slices(split: str = "test", *, clip: tuple[float, float] | None = (HU_MIN, HU_MAX)
                   ) -> list[DicomSlice]:
    """Load the held-out slices: ``[DicomSlice(hu, meta), ...]`` sorted by file name.

    ``hu`` is a float32 ``(512, 512)`` HU array, clipped to ``clip`` (default
    ``[-1024, 3071]``, which maps the −3024/−2048 padding outside the scan circle to air;
    ``clip=None`` keeps the raw values). ``meta.patient_id`` and ``meta.file_name`` identify
    each slice.
    """
    return read_dicom_slices(heldout_files(split), clip=clip)
