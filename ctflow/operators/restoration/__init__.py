r"""Image-restoration operators on batched images ``(B, C, H, W)``, all torch-native.

Every operator here acts channel-wise on images of domain shape ``(H, W)``, follows its input's
device and dtype, is differentiable by torch autograd, and solves the shifted normal equations

.. math:: (A^T A + s I)\,x = b, \qquad s \ge 0,

exactly in closed form (:meth:`~ctflow.operators.LinearOperator.solve_shifted_normal`), except
the zero-boundary blur, which has no closed form and returns ``None``. With ``s = 0`` a solve
returns ``None`` when :math:`A^T A` is singular.

* :class:`GaussianBlur` -- :math:`Ax = k * x` with a normalised Gaussian kernel :math:`k`;
  circular boundary (diagonal in the DFT basis, :math:`\hat{A} = \hat K`) or zero padding.
* :class:`Inpainting` -- :math:`Ax = m \odot x` with a 0/1 mask :math:`m` (random pixels, a box,
  or free-form brush strokes); self-adjoint, :math:`A^T A = \mathrm{diag}(m)`.
* :class:`SuperResolution` -- :math:`k \times k` average pooling or decimation; both have
  :math:`AA^T = cI` (:math:`c = 1/k^2` resp. :math:`1`), hence the Woodbury solve
  :math:`x = (b - A^T A b / (s + c)) / s`.
* :class:`Denoising` -- the identity.

Modules: :mod:`~ctflow.operators.restoration.image` (the shared base),
:mod:`~ctflow.operators.restoration.masks`, :mod:`~ctflow.operators.restoration.blur`,
:mod:`~ctflow.operators.restoration.inpainting` and
:mod:`~ctflow.operators.restoration.superresolution`.
"""
from ctflow.operators.restoration.blur import GaussianBlur, gaussian_kernel_1d
from ctflow.operators.restoration.inpainting import Inpainting
from ctflow.operators.restoration.masks import box_mask, freeform_mask, random_mask
from ctflow.operators.restoration.superresolution import Denoising, SuperResolution

__all__ = ["GaussianBlur", "Inpainting", "SuperResolution", "Denoising",
           "random_mask", "box_mask", "freeform_mask", "gaussian_kernel_1d"]
