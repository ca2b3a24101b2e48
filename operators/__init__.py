"""Forward operators on one interface (installed as ``ctflow.operators``).

This package imports nothing from the rest of ctflow.
"""
from .base import (AdjointFunction, AdjointOperator, ComposedOperator, LinearOperator,
                   ScaledOperator, SumOperator, check_batched)

__all__ = ["LinearOperator", "AdjointOperator", "ComposedOperator", "ScaledOperator",
           "SumOperator", "AdjointFunction", "check_batched"]

# Image restoration (blur, inpainting, super-resolution, denoising).
from .restoration import Denoising, GaussianBlur, Inpainting, SuperResolution  # noqa: E402

__all__ += ["GaussianBlur", "Inpainting", "SuperResolution", "Denoising"]
