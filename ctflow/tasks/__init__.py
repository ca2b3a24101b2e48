"""Application tasks: problem set-up, DICOM series reconstruction, the demo, ``ctflow info``.

The CLI, the demo, the distributed layer and the benchmarks use these names (package level):

* :mod:`ctflow.tasks.problem` -- the one problem set-up (operator, working size, simulated
  measurement, noise check, prior, solver call, per-slice seed);
* :mod:`ctflow.tasks.sinograms` -- measured sinogram files and HDF5 datasets;
* :mod:`ctflow.tasks.series` -- :func:`reconstruct_dicom` (a DICOM series, slice by slice)
  and :func:`solve_slice` (one slice, in-process or in a worker of ``map_slices``);
* :mod:`ctflow.tasks.outputs`, :mod:`ctflow.tasks.montage` -- its output folder and figure;
* :mod:`ctflow.tasks.demo` -- the offline demo; :mod:`ctflow.tasks.info` -- ``ctflow info``,
  devices and versions.

This layer imports only the layers below it (solvers, priors, flow, operators, data,
metrics); the distributed layer and the CLI call into it, never the other way round.
"""
from ctflow.tasks.demo import DEMO_METHODS, DEMO_SETTINGS, run_demo
from ctflow.tasks.info import DeviceError, format_info, info, resolve_device, versions
from ctflow.tasks.montage import write_montage
from ctflow.tasks.problem import (DEFAULT_HU_WINDOW, DEFAULT_SIZE, FAN_DISTANCES, check_noise,
                                  from_working_size, geometry_names, infer_size,
                                  make_ct_operator, measure, resolve_prior, run_solver,
                                  simulate_lowdose, simulate_measurement, slice_seed,
                                  to_working_size, working_size)
from ctflow.tasks.series import SliceMapper, reconstruct_dicom
from ctflow.tasks.slices import solve_slice
from ctflow.tasks.sinograms import load_sinograms, read_h5_array, slice_stack

__all__ = ["DEFAULT_HU_WINDOW", "DEFAULT_SIZE", "FAN_DISTANCES", "check_noise",
           "from_working_size", "infer_size", "make_ct_operator", "resolve_prior",
           "run_solver", "simulate_measurement", "slice_seed", "to_working_size", "working_size",
           "simulate_lowdose", "geometry_names", "measure",
           "load_sinograms", "read_h5_array", "slice_stack", "reconstruct_dicom", "solve_slice",
           "SliceMapper", "write_montage", "versions", "DeviceError", "format_info", "info",
           "resolve_device", "DEMO_METHODS", "DEMO_SETTINGS", "run_demo"]
