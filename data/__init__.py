"""Data loaders: phantoms, MedMNIST, DICOM, NIfTI, HDF5 (installed as ``ctflow.data``).

This package imports nothing from the rest of ctflow.
"""
from .volume import HU_MAX, HU_MIN, SliceMeta, Volume, clip_hu, unwindow_hu, window_hu
from .dicom import (DicomError, DicomSlice, list_dicom_files, read_dicom_series,
                    read_dicom_slices)
from .splits import (SPLIT_NAMES, SPLITS, TEST_PATIENTS, TRAIN_COVID_PATIENTS,
                     VALIDATION_PATIENTS, SplitPart, split_files, split_of_patient, split_parts)
from .samples import SAMPLE_NAMES, heldout_files, heldout_slices, sample_files, sample_path

__all__ = [
    # volume and windowing
    "Volume", "SliceMeta", "clip_hu", "window_hu", "unwindow_hu", "HU_MIN", "HU_MAX",
    # DICOM reading
    "DicomError", "DicomSlice", "read_dicom_series", "read_dicom_slices", "list_dicom_files",
    # split and bundled samples
    "SplitPart", "SPLITS", "SPLIT_NAMES", "TEST_PATIENTS", "VALIDATION_PATIENTS",
    "TRAIN_COVID_PATIENTS", "split_parts", "split_of_patient", "split_files",
    "SAMPLE_NAMES", "sample_path", "sample_files", "heldout_files", "heldout_slices",
]
