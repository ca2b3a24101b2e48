"""Forward operators on one interface (installed as ``ctflow.operators``).

This package imports nothing from the rest of ctflow.
"""
from .base import (AdjointFunction, AdjointOperator, ComposedOperator, LinearOperator,
                   ScaledOperator, SumOperator, check_batched)

__all__ = ["LinearOperator", "AdjointOperator", "ComposedOperator", "ScaledOperator",
           "SumOperator", "AdjointFunction", "check_batched"]
