"""CT operators: geometries, the ray transform (torch / ODL / tomosipo backends) and FBP.

Installed as ``ctflow.operators.ct``. See :mod:`.geometry` for the orientation and angle
conventions shared by every backend.
"""
from ctflow.operators.ct.backends import (BackendInfo, available_backends, backend_names, format_backends,
                       register_backend)
from ctflow.operators.ct.fbp import FBP, angle_weights, ramp_filter_response
from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D
from ctflow.operators.ct.presets import (PRESETS, GeometryPreset, check_field_of_view, preset,
                                         preset_names)
from ctflow.operators.ct.ray_transform import RayTransform
from ctflow.operators.ct.torch_backend import cache_info as matrix_cache_info
from ctflow.operators.ct.torch_backend import clear_cache as clear_matrix_cache

__all__ = ["ParallelBeam2D", "FanBeam2D", "Geometry2D", "RayTransform", "FBP",
           "available_backends", "format_backends", "BackendInfo", "register_backend",
           "backend_names", "angle_weights", "ramp_filter_response", "matrix_cache_info",
           "clear_matrix_cache", "preset", "preset_names", "PRESETS", "GeometryPreset",
           "check_field_of_view"]
