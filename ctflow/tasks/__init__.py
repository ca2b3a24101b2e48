"""Application tasks: problem set-up, DICOM series reconstruction, the demo, ``ctflow info``.

The CLI, the demo, the distributed layer and the benchmarks use these names (package level).
"""
from ctflow.tasks.series import (DEFAULT_HU_WINDOW, DEFAULT_SIZE, from_working_size,
                                 infer_size, load_sinograms, make_ct_operator, read_h5_array,
                                 reconstruct_dicom, resolve_prior, run_solver, simulate_measurement,
                                 slice_seed, slice_stack, solve_slice, to_working_size, versions,
                                 write_montage)
from ctflow.tasks.info import DeviceError, format_info, info, resolve_device
from ctflow.tasks.demo import DEMO_METHODS, DEMO_SETTINGS, run_demo

__all__ = ["DEFAULT_HU_WINDOW", "DEFAULT_SIZE", "from_working_size", "infer_size",
           "load_sinograms", "make_ct_operator", "read_h5_array", "reconstruct_dicom",
           "resolve_prior", "run_solver", "simulate_measurement", "slice_seed", "slice_stack",
           "solve_slice", "to_working_size", "versions", "write_montage", "DeviceError",
           "format_info", "info", "resolve_device", "DEMO_METHODS", "DEMO_SETTINGS", "run_demo"]
