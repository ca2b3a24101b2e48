"""Test-wide settings.

The suite runs many tiny tensor operations; on a 2-core CI machine torch's intra-op thread pool
costs far more than it gains for them, so tests run single-threaded.
"""
import torch

torch.set_num_threads(1)
