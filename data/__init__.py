"""Data loaders: phantoms, MedMNIST, DICOM, NIfTI, HDF5 (installed as ``ctflow.data``).

This package imports nothing from the rest of ctflow.
"""
__all__: list = []
