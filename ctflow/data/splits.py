"""The fixed patient-level split of the real CT data used by ctflow.

The split is by patient (never by slice): every slice of a patient is on one side.

========================  =========================================================  ======
split                     contents                                                   slices
========================  =========================================================  ======
``test`` (held out)       COVID-19-NY-SBU patients A058062, A062055, A067967,         10
                          A072894, A098752 (2 single slices each)
``validation`` (tuning)   COVID-19-NY-SBU patients A048383, A056642                   4
``train``                 Lung-PET-CT-Dx Lung_Dx-A0001 (64-slice series),             498 DICOM
                          POPI/ITKElastix thorax phase 00 (47 slices),                + NIfTI
                          TotalSegmentator example (20 DICOM slices and the NIfTI
                          volume's axial slices), COVID-19-NY-SBU patients
                          A002304, A027284, A046441 (6 slices), and three
                          full-resolution series: LIDC-IDRI-0314 (92 chest slices),
                          TCGA-DE-A4MA (135, skull base to thigh), Pancreas-CT-CB_001
                          (134, pelvis to chest)
========================  =========================================================  ======

The test and validation files ship with ctflow (``ctflow.data.samples``); the training data
is read from a local copy of the source folders, laid out as

    <root>/covid19-ny-sbu-slices/<patient>_<original name>.dcm
    <root>/lung-pet-ct-dx-a0001/1-NN.dcm
    <root>/popi-4dct-itkelastix/00-sliceNNN.dcm
    <root>/totalseg-example/dicom/CT.<SOPInstanceUID>
    <root>/totalseg-example/example_ct.nii.gz
    <root>/lidc-idri-0314/NNNNNN.dcm
    <root>/tcga-thca-de-a4ma/1-NNN.dcm
    <root>/pancreatic-ct-cbct-seg-001/1-NNN.dcm

and :func:`split_files` lists the files of one split under such a root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SplitPart",
    "TEST_PATIENTS",
    "VALIDATION_PATIENTS",
    "TRAIN_COVID_PATIENTS",
    "SPLITS",
    "SPLIT_NAMES",
    "split_parts",
    "split_of_patient",
    "split_files",
]


@dataclass(frozen=True)
class SplitPart:
    """One patient's files in one source folder.

    ``kind`` says how to read them: ``"dicom-series"`` (one volume,
    :func:`~ctflow.data.dicom.read_dicom_series`), ``"dicom-slices"`` (independent slices,
    :func:`~ctflow.data.dicom.read_dicom_slices`) or ``"nifti"``
    (:func:`~ctflow.data.nifti.read_nifti`). ``pattern`` is a glob relative to
    ``<root>/<source>``; ``n_files`` the number of files it must match (``n_slices`` the
    number of 2-D slices they hold, ``None`` where it depends on the reader).
    """

    source: str
    patient: str
    kind: str
    pattern: str
    n_files: int
    n_slices: int | None


COVID = "covid19-ny-sbu-slices"

#: Held-out test patients (benchmarks and demo).
TEST_PATIENTS: tuple[str, ...] = ("A058062", "A062055", "A067967", "A072894", "A098752")
#: Validation patients (tuning).
VALIDATION_PATIENTS: tuple[str, ...] = ("A048383", "A056642")
#: COVID-19-NY-SBU patients in the training split.
TRAIN_COVID_PATIENTS: tuple[str, ...] = ("A002304", "A027284", "A046441")


def _covid(patients: tuple[str, ...]) -> tuple[SplitPart, ...]:
    return tuple(SplitPart(COVID, p, "dicom-slices", f"{p}_*.dcm", 2, 2) for p in patients)


#: The split: name -> the parts it holds.
SPLITS: dict[str, tuple[SplitPart, ...]] = {
    "train": (
        SplitPart("lung-pet-ct-dx-a0001", "Lung_Dx-A0001", "dicom-series", "*.dcm", 64, 64),
        SplitPart("popi-4dct-itkelastix", "POPI-00", "dicom-series", "00-slice*.dcm", 47, 47),
        SplitPart("totalseg-example", "totalseg-dicom", "dicom-series", "dicom/CT.*", 20, 20),
        SplitPart("totalseg-example", "totalseg-nifti", "nifti", "example_ct.nii.gz", 1, None),
        SplitPart("lidc-idri-0314", "LIDC-IDRI-0314", "dicom-series", "*.dcm", 92, 92),
        SplitPart("tcga-thca-de-a4ma", "TCGA-DE-A4MA", "dicom-series", "*.dcm", 135, 135),
        SplitPart("pancreatic-ct-cbct-seg-001", "Pancreas-CT-CB_001", "dicom-series", "*.dcm",
                  134, 134),
    ) + _covid(TRAIN_COVID_PATIENTS),
    "validation": _covid(VALIDATION_PATIENTS),
    "test": _covid(TEST_PATIENTS),
}
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")


def split_parts(split: str) -> tuple[SplitPart, ...]:
    """The parts (source folder, patient, reader kind, glob) of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLIT_NAMES}")
    return SPLITS[split]


def split_of_patient(patient: str) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) that holds ``patient``."""
    for name, parts in SPLITS.items():
        if any(p.patient == patient for p in parts):
            return name
    known = sorted(p.patient for parts in SPLITS.values() for p in parts)
    raise ValueError(f"patient {patient!r} is in no split; known patients: {known}")


def split_files(split: str, root: str | os.PathLike,
                *, strict: bool = True) -> list[tuple[SplitPart, list[Path]]]:
    """List the files of ``split`` under a local copy ``root`` of the CT source folders.

    Returns ``[(part, sorted files), ...]`` in the order of :data:`SPLITS`. With
    ``strict=True`` a part whose glob does not match exactly ``part.n_files`` files raises a
    ``FileNotFoundError`` naming the folder and pattern (so a wrong root or an incomplete copy
    is caught before training); with ``strict=False`` such parts are returned as found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CT data root not found: {root}")
    out = []
    for part in split_parts(split):
        folder = root / part.source
        files = sorted(f for f in folder.glob(part.pattern) if f.is_file())
        if strict and len(files) != part.n_files:
            raise FileNotFoundError(
                f"{folder}: expected {part.n_files} file(s) matching {part.pattern!r} for "
                f"patient {part.patient} ({split} split), found {len(files)}")
        out.append((part, files))
    return out
