"""Data loaders: phantoms, MedMNIST, DICOM, NIfTI, HDF5 (installed as ``ctflow.data``).

This package imports nothing from the rest of ctflow.
"""
from ctflow.data.volume import HU_MAX, HU_MIN, SliceMeta, Volume, clip_hu, unwindow_hu, window_hu
from ctflow.data.dicom import (NON_DICOM_SUFFIXES, DicomError, DicomSlice, list_dicom_files,
                    read_dicom_series, read_dicom_slices)
from ctflow.data.dicom_write import (choose_rescale, derived_file_name, derived_output_name,
                                    derived_series_number, derived_series_uid,
                                    write_dicom_series, write_dicom_slice)
from ctflow.data.nifti import read_nifti, write_nifti
from ctflow.data.phantoms import (MODIFIED_SHEPP_LOGAN_ELLIPSES, SHEPP_LOGAN_ELLIPSES, EllipsesDataset,
                       ellipse_image, shepp_logan)
from ctflow.data.medmnist import MEDMNIST_SIZES, MedMNIST, medmnist_file
from ctflow.data.hdf5 import LODOPAB_PARTS, LoDoPaB, ResultStore
from ctflow.data.splits import (SPLIT_NAMES, SPLITS, TEST_PATIENTS, TRAIN_COVID_PATIENTS,
                     VALIDATION_PATIENTS, SplitPart, split_files, split_of_patient, split_parts)
from ctflow.data.atomic import (atomic_save, atomic_write_bytes, atomic_write_json,
                                atomic_write_text, json_default)
from ctflow.data.samples import SAMPLE_NAMES, heldout_files, heldout_slices, sample_files, sample_path

__all__ = [
    # volume and windowing
    "Volume", "SliceMeta", "clip_hu", "window_hu", "unwindow_hu", "HU_MIN", "HU_MAX",
    # DICOM
    "DicomError", "DicomSlice", "read_dicom_series", "read_dicom_slices", "list_dicom_files",
    "NON_DICOM_SUFFIXES", "write_dicom_series", "write_dicom_slice", "derived_series_uid",
    "derived_file_name", "derived_output_name", "derived_series_number", "choose_rescale",
    # NIfTI
    "read_nifti", "write_nifti",
    # phantoms
    "shepp_logan", "ellipse_image", "EllipsesDataset", "SHEPP_LOGAN_ELLIPSES",
    "MODIFIED_SHEPP_LOGAN_ELLIPSES",
    # MedMNIST
    "MedMNIST", "MEDMNIST_SIZES", "medmnist_file",
    # HDF5
    "LoDoPaB", "LODOPAB_PARTS", "ResultStore",
    # split and bundled samples
    "SplitPart", "SPLITS", "SPLIT_NAMES", "TEST_PATIENTS", "VALIDATION_PATIENTS",
    "TRAIN_COVID_PATIENTS", "split_parts", "split_of_patient", "split_files",
    "SAMPLE_NAMES", "sample_path", "sample_files", "heldout_files", "heldout_slices",
    # atomic writes
    "atomic_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "json_default",
]
