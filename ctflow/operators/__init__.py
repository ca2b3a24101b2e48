"""Forward operators on one interface (installed as ``ctflow.operators``).

This package imports nothing from the rest of ctflow.
"""
from ctflow.operators.base import (AdjointFunction, AdjointOperator, ComposedOperator, LinearOperator,
                   ScaledOperator, SumOperator, check_batched)

__all__ = ["LinearOperator", "AdjointOperator", "ComposedOperator", "ScaledOperator",
           "SumOperator", "AdjointFunction", "check_batched"]

# Image restoration (blur, inpainting, super-resolution, denoising).
from ctflow.operators.restoration import Denoising, GaussianBlur, Inpainting, SuperResolution  # noqa: E402

__all__ += ["GaussianBlur", "Inpainting", "SuperResolution", "Denoising"]

# CT: geometries, ray transform (torch / odl / tomosipo backends), filtered back-projection.
from ctflow.operators.ct import FBP, FanBeam2D, ParallelBeam2D, RayTransform, available_backends  # noqa: E402

__all__ += ["ParallelBeam2D", "FanBeam2D", "RayTransform", "FBP", "available_backends"]
